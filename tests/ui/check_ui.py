#!/usr/bin/env python3
"""End-to-end check of the /ui dashboard in headless Chromium.

Starts `tollgate demo` (simulated provider and agent fleet) on ephemeral
ports, waits for its first batch of runs, then drives Chromium over the
DevTools protocol:

- the overview: the segments table shows, per release, the numbers that
  `/api/segments` answers for the same window (read back from the page's
  cells and compared with a direct query), the burn-rate chart, the
  per-release bars and the top runs are drawn;
- a run page (the costliest run from the top-runs table) lists every call
  `/api/runs/{id}` answers;
- the compare view shows the five signals of `/api/compare`;
- no JavaScript exception, console error or failed load (CSP included);
- a screenshot of the overview goes to docs/dashboard.png.

Needs: target/debug/tollgate (built by `cargo build`), chromium, and the
`websocket-client` package. Bounded: every wait has a deadline, and whatever
was started is stopped on exit.

    python3 tests/ui/check_ui.py [--binary PATH] [--chromium PATH] [--screenshot PATH]
"""

import argparse
import base64
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websocket  # websocket-client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ["runs", "cost_per_run", "cost_p95", "burn_rate_usd_per_hour", "cost_per_1k_runs", "estimated_share"]


def fail(message):
    print(f"FAIL: {message}", flush=True)
    raise SystemExit(1)


def step(message):
    print(f"-- {message}", flush=True)


class Proc:
    """A child process whose output lines are collected by a thread."""

    def __init__(self, argv, stream="stdout"):
        self.lines = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        pipe = self.p.stdout if stream == "stdout" else self.p.stderr
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        for line in pipe:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pattern, timeout, what):
        deadline = time.time() + timeout
        regex = re.compile(pattern)
        with self.cond:
            while True:
                for line in self.lines:
                    m = regex.search(line)
                    if m:
                        return m
                if self.p.poll() is not None:
                    fail(f"{what}: the process exited ({self.p.returncode}); output:\n" + "\n".join(self.lines[-40:]))
                left = deadline - time.time()
                if left <= 0:
                    fail(f"{what}: not seen within {timeout}s; output:\n" + "\n".join(self.lines[-40:]))
                self.cond.wait(min(left, 0.5))

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGINT)
                self.p.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(timeout=5)


class Browser:
    """One Chromium page driven over the DevTools protocol."""

    def __init__(self, chromium, profile):
        self.proc = Proc(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1440,1000",
                "about:blank",
            ],
            stream="stderr",
        )
        m = self.proc.wait_for(r"DevTools listening on (ws://\S+)", 30, "chromium start")
        port = re.search(r"ws://[^:/]+:(\d+)/", m.group(1)).group(1)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.problems = []
        for domain in ["Page", "Runtime", "Log"]:
            self.call(f"{domain}.enable")

    def _event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            self.problems.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.problems.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            e = params["entry"]
            self.problems.append(f"{e.get('source')} {e['level']}: {e.get('text')} {e.get('url', '')}")

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    fail(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            fail(f"evaluating {expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url, view, timeout=30):
        """Navigates and waits until the page says the view is ready."""
        self.eval("document.body && (document.body.dataset.state = 'navigating')")
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        check = f"document.body && document.body.dataset.state === 'ready' && document.body.dataset.view === '{view}'"
        while time.time() < deadline:
            if self.eval(check):
                return
            time.sleep(0.2)
        fail(f"{url}: view {view} not ready within {timeout}s (state {self.eval('document.body && document.body.dataset.state')})")

    def screenshot(self, path):
        height = self.eval("Math.ceil(document.documentElement.scrollHeight)")
        self.call("Emulation.setDeviceMetricsOverride", width=1440, height=min(max(height, 600), 4000), deviceScaleFactor=1, mobile=False)
        time.sleep(0.3)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.stop()


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def shown_number(text):
    """The number a cell shows ("$0.0525", "1,234", "12%", "–")."""
    t = text.replace("$", "").replace(",", "").strip()
    if t in ("", "–"):
        return None
    if t.endswith("%"):
        return float(t[:-1]) / 100
    return float(t)


def close_enough(shown, actual, text):
    """`shown` is `actual` rounded to the digits the cell displays."""
    if actual is None:
        return shown is None
    if shown is None:
        return False
    digits = text.replace("%", "").split(".")
    places = len(re.sub(r"\D", "", digits[1])) if len(digits) > 1 else 0
    step = 10 ** -places
    if text.strip().endswith("%"):
        step /= 100
    return abs(shown - actual) <= step / 2 + 1e-12 + abs(actual) * 1e-9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "tollgate"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--screenshot", default=os.path.join(ROOT, "docs", "dashboard.png"))
    args = ap.parse_args()
    for path in (args.binary, args.chromium):
        if not os.path.exists(path):
            fail(f"{path} is missing")

    started = []
    profile = tempfile.mkdtemp(prefix="tollgate-ui-")
    # Hard stop for the whole check.
    signal.signal(signal.SIGALRM, lambda *_: fail("the check took over 240 s"))
    signal.alarm(240)
    try:
        step("starting tollgate demo")
        demo = Proc([args.binary, "demo", "--agent-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--runs", "16", "--speed", "20"])
        started.append(demo)
        admin = demo.wait_for(r"(http://127\.0\.0\.1:\d+)/metrics", 120, "demo summary").group(1)
        step(f"admin listener {admin}")

        page = urllib.request.urlopen(admin + "/ui", timeout=10)
        csp = page.headers.get("Content-Security-Policy", "")
        if not csp.startswith("default-src 'self'") or not page.headers.get("Content-Type", "").startswith("text/html"):
            fail(f"/ui headers: {dict(page.headers)}")

        # Let the ledger commit the batch's last records, then look at a
        # window that ends now: the page and the direct query see the same.
        time.sleep(1.5)
        until = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        until_text = until.strftime("%Y-%m-%dT%H:%M:%SZ")
        time.sleep(1.0)

        browser = Browser(args.chromium, profile)
        started.append(browser)

        step("overview")
        browser.goto(f"{admin}/ui#by=release&since=1h&until={until_text}", "overview")
        table = browser.eval(
            """(() => {
              const t = document.getElementById('segments-table');
              if (!t) return null;
              return {since: t.dataset.since, until: t.dataset.until, rows: [...t.querySelectorAll('tbody tr')].map(tr => {
                const row = {segment: JSON.parse(tr.dataset.key)};
                for (const td of tr.querySelectorAll('td[data-field]')) row[td.dataset.field] = {value: td.dataset.value, text: td.textContent.trim()};
                return row;
              })};
            })()"""
        )
        if not table:
            fail("no segments table: " + browser.eval("document.getElementById('segments').textContent"))
        api = get_json(f"{admin}/api/segments?by=release&limit=1000&since={table['since']}&until={table['until']}")
        want = {s["key"]["release"]: s for s in api["segments"]}
        got = {r["segment"]["release"]: r for r in table["rows"]}
        if set(want) != set(got) or len(want) < 2:
            fail(f"releases shown {sorted(got)} != API {sorted(want)}")
        for release, seg in want.items():
            row = got[release]
            for field in FIELDS:
                cell = row[field]
                value = float(cell["value"]) if cell["value"] != "" else None
                if value != seg[field]:
                    fail(f"{release} {field}: page value {cell['value']} != API {seg[field]}")
                if not close_enough(shown_number(cell["text"]), seg[field], cell["text"]):
                    fail(f"{release} {field}: shows {cell['text']!r} for {seg[field]}")
            if row["status"]["value"] != seg["status"]:
                fail(f"{release} status: {row['status']['value']} != {seg['status']}")
            print(f"   {release}: runs {row['runs']['text']}, cost/run {row['cost_per_run']['text']}, p95 {row['cost_p95']['text']}, "
                  f"burn {row['burn_rate_usd_per_hour']['text']}/h, status {seg['status']} (matches /api/segments)")
        panels = browser.eval(
            """({
              chart: document.querySelectorAll('#burn svg.chart path.series').length,
              bars: document.querySelectorAll('#per-release .bar-group').length,
              runs: [...document.querySelectorAll('#top-runs-table tbody tr a')].map(a => a.getAttribute('href')),
              errors: [...document.querySelectorAll('.error')].map(e => e.textContent),
            })"""
        )
        if panels["errors"]:
            fail(f"panels show errors: {panels['errors']}")
        if panels["chart"] < 1 or panels["bars"] != len(want) or not panels["runs"]:
            fail(f"panels incomplete: {panels}")
        top = get_json(f"{admin}/api/runs?sort=cost&limit=10&since={table['since']}&until={table['until']}")
        if len(panels["runs"]) != len(top["runs"]):
            fail(f"top runs: {len(panels['runs'])} shown, API has {len(top['runs'])}")
        print(f"   burn chart {panels['chart']} lines, {panels['bars']} release bar groups, {len(panels['runs'])} top runs")
        browser.screenshot(args.screenshot)
        step(f"screenshot {os.path.relpath(args.screenshot, ROOT)}")
        browser.call("Emulation.clearDeviceMetricsOverride")

        step("run page")
        # The costliest run that has ended (its calls no longer change).
        ended = [r for r in top["runs"] if r["status"] != "active"]
        if not ended:
            fail("no ended run in the top runs")
        run = ended[0]
        href = next(h for h in panels["runs"] if f"run={run['run_id']}&" in h or h.endswith(f"run={run['run_id']}"))
        browser.goto(f"{admin}/ui{href}", "run")
        detail = get_json(f"{admin}/api/runs/{run['run_id']}?started_ms={run['started_ms']}&limit=1000")
        shown = browser.eval(
            """({
              rows: document.querySelectorAll('#calls-table tbody tr').length,
              refused: document.querySelectorAll('#calls-table tbody tr.refused').length,
              costs: [...document.querySelectorAll('#calls-table tbody td[data-value]')].map(td => Number(td.dataset.value)),
              total: document.querySelector('#run-cost .big') && Number(document.querySelector('#run-cost .big').dataset.value),
            })"""
        )
        calls = detail["calls"]
        if shown["rows"] != len(calls) or shown["rows"] != detail["total"]:
            fail(f"run {run['run_id']}: {shown['rows']} call rows, API has {len(calls)} of {detail['total']}")
        if shown["costs"] != [c["cost_usd"] for c in calls] or shown["total"] != detail["run"]["cost_usd"]:
            fail(f"run {run['run_id']}: costs differ: {shown} vs {detail['run']['cost_usd']}")
        refused = sum(1 for c in calls if c["outcome"] == "refused" or c["status"] == 402)
        if shown["refused"] != refused:
            fail(f"run {run['run_id']}: {shown['refused']} refused rows, API has {refused}")
        print(f"   {run['run_id']}: {shown['rows']} calls ({refused} refused), cost {detail['run']['cost_usd']}")

        step("compare")
        releases = sorted(want)
        compare_query = f"base={releases[0]}&head={releases[-1]}&since=1h"
        # The window ends at "now" and the demo's trickle adds a run every
        # few seconds, so a signal such as "run count stable" can flip
        # between the page's query and this one. The page must show what
        # the API answered just before or just after it rendered; when the
        # two answers differ and the page matches neither, the data moved
        # mid-check and the comparison is retried.
        for attempt in range(3):
            if attempt:
                browser.goto(f"{admin}/ui#since=24h", "overview")
            api_before = get_json(f"{admin}/api/compare?{compare_query}")
            browser.goto(f"{admin}/ui#compare&{compare_query}", "compare")
            cmp_page = browser.eval(
                """({
                  signals: [...document.querySelectorAll('#compare-signals li')].map(li => [li.dataset.signal, li.classList.contains('matched')]),
                  rows: document.querySelectorAll('#compare-deltas tbody tr').length,
                })"""
            )
            cmp_api = get_json(f"{admin}/api/compare?{compare_query}")
            answers = [[[s["name"], s["matched"]] for s in a["signals"]] for a in (api_before, cmp_api)]
            if cmp_page["rows"] < 5:
                fail(f"compare: {cmp_page['rows']} delta rows")
            if cmp_page["signals"] in answers:
                break
            if answers[0] == answers[1] or attempt == 2:
                fail(f"compare: page {cmp_page} != API {answers[1]} (before the page: {answers[0]})")
        print(f"   {releases[-1]} vs {releases[0]}: diagnosis {cmp_api['diagnosis']}")

        # Back to the overview, to catch errors of a second render.
        browser.goto(f"{admin}/ui#since=24h", "overview")
        browser.call("Runtime.evaluate", expression="1")
        if browser.problems:
            fail("browser reported:\n  " + "\n  ".join(browser.problems))
        step("no console errors, exceptions or failed loads")
        print("PASS: /ui dashboard", flush=True)
    finally:
        signal.alarm(0)
        for s in reversed(started):
            s.close() if isinstance(s, Browser) else s.stop()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
