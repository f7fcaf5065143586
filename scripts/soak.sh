#!/usr/bin/env bash
# Soak test: a fixed-rate mix of calls, with faults injected throughout,
# through tollgate for a bounded time on loopback, then a consistency and
# memory report.
#
# Builds the dist profile, starts examples/mock_upstream and target/dist/tollgate
# (generated config, both on port 0; addresses read from the mock's first
# stdout line and tollgate's "tollgate listening" log line) with a ledger,
# upstream_response_timeout_ms = 1000 and runs.idle_timeout_secs = 30, and
# drives, at RATE requests/s for DURATION seconds (python3, stdlib only), a
# fixed interleaving of:
#   json 34%        non-streaming chat completion                 200
#   stream 18%      streamed, asking for usage                    200
#   inject 8%       streamed, not asking (usage injected, stripped) 200
#   tool 14%        paid tool route (cost_per_call_usd)           200
#   budget 10%      runs with a tiny x-agent-budget-usd           402
#   dead 3%         a route whose upstream is a closed port       502
#   error500 4%     upstream answers 500 (x-mock-fault)           500
#   reset 3%        upstream resets the stream after 5 events     200, cut
#   slow 2%         upstream sends headers after 1500 ms          504
#   disconnect 4%   client closes after the first event of a
#                   slow stream (20 ms between events)            200, cut
# tollgate's RSS is sampled every 10 s. At the end tollgate gets SIGTERM
# (ledger flushed) and the script checks:
#   requests sent = completed = ledger records
#       = agent_calls_total + budget refusals (agent_budget_rejections_total);
#   per status: client statuses = ledger = agent_calls_total{status}
#       (+ refusals for 402); per kind, the ledger outcome expected
#       (complete, upstream_error for resets, client_gone for disconnects);
#   no "panicked" in the log;
#   RSS flat after warm-up: the mean of the last minute's samples within
#       RSS_TOLERANCE_PCT of the second minute's (runs of 3 minutes or more).
# Exit 0 when every check holds, 1 otherwise.
#
# Environment (defaults): DURATION=300 RATE=50 WORKERS=24
# RSS_TOLERANCE_PCT=10 KEEP=0 (KEEP=1 keeps the work directory with logs
# and the ledger).

set -euo pipefail

DURATION=${DURATION:-300}
RATE=${RATE:-50}
WORKERS=${WORKERS:-24}
RSS_TOLERANCE_PCT=${RSS_TOLERANCE_PCT:-10}
KEEP=${KEEP:-0}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
harness_init soak
keep_work=$KEEP

# shellcheck disable=SC2119 # nothing to build beyond tollgate and the mock
build_dist

start_mock "$work" --threads 2 --max-secs $((DURATION + 120))

# A loopback port nothing listens on: bound, then released.
closed_port=$(free_port)

write_tollgate_config "$work/tollgate.toml" "$mock_addr" <<EOF
[[routes]]
name = "search"
prefix = "/tools/search"
upstream = "http://$mock_addr"
kind = "tool"
tool = "web_search"
cost_per_call_usd = 0.001

[[routes]]
name = "dead"
prefix = "/dead"
upstream = "http://127.0.0.1:$closed_port"
kind = "openai"

[ledger]
path = "$work/ledger.db"

[limits]
upstream_response_timeout_ms = 1000

# Runs end 30 s after their last call and leave memory, so run state reaches
# its steady size within the first minute (the budget mix opens a run per
# call) and the RSS comparison measures leaks, not the run table filling.
[runs]
idle_timeout_secs = 30
EOF

start_tollgate_process "$bin/tollgate" "$work/tollgate"
agent=$tollgate_agent
admin=$tollgate_admin
echo "mock on $mock_addr, tollgate on $agent (admin $admin), pid $tollgate_pid" >&2
echo "soak: ${DURATION}s at ${RATE} req/s" >&2

python3 - "$agent" "$admin" "$tollgate_pid" "$DURATION" "$RATE" "$WORKERS" "$work" "$RSS_TOLERANCE_PCT" <<'PY'
import http.client, json, os, queue, re, signal, sqlite3, sys, threading, time

agent, admin, pid, duration, rate, workers, work, tolerance = sys.argv[1:9]
pid, duration, rate, workers, tolerance = int(pid), float(duration), float(rate), int(workers), float(tolerance)
host, port = agent.rsplit(":", 1)

MIX = [("json", 34), ("stream", 18), ("inject", 8), ("tool", 14), ("budget", 10), ("dead", 3),
       ("error500", 4), ("reset", 3), ("slow", 2), ("disconnect", 4)]
# kind -> (HTTP status the client sees, ledger outcome)
EXPECT = {"json": (200, "complete"), "stream": (200, "complete"), "inject": (200, "complete"),
          "tool": (200, "complete"), "budget": (402, "refused"),
          "dead": (502, "upstream_unreachable"), "error500": (500, "complete"),
          "reset": (200, "upstream_error"), "slow": (504, "upstream_timeout"),
          "disconnect": (200, "client_gone")}
assert sum(w for _, w in MIX) == 100
SEQ = [k for k, w in MIX for _ in range(w)]
# Spread the kinds evenly: a fixed permutation of the 100-slot cycle.
SEQ = [SEQ[(i * 37) % 100] for i in range(100)]

def request(kind, i):
    run = f"soak-{i % 64}"
    headers = {"content-type": "application/json", "x-agent-release": "soak",
               "x-agent-run-id": run}
    body = {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": f"q{i}"}]}
    path = "/openai/v1/chat/completions"
    if kind == "stream":
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "inject":
        body["stream"] = True
    elif kind == "tool":
        path, body = "/tools/search", {"q": f"q{i}"}
    elif kind == "budget":
        headers["x-agent-run-id"] = f"tiny-{i}"
        headers["x-agent-budget-usd"] = "0.000000001"
    elif kind == "dead":
        path = "/dead/v1/chat/completions"
    elif kind == "error500":
        headers["x-mock-fault"] = "status-500"
    elif kind == "reset":
        body["stream"] = True
        headers["x-mock-fault"] = "reset-after=5"
    elif kind == "slow":
        headers["x-mock-fault"] = "headers-after-ms=1500"
    elif kind == "disconnect":
        body.update(stream=True, stream_options={"include_usage": True})
        headers["x-mock-chunk-delay-us"] = "20000"
    return path, headers, json.dumps(body)

jobs = queue.Queue()
lock = threading.Lock()
statuses = {}          # (kind, status) -> count
cut = {}               # kind -> bodies that ended early, as the kind expects
errors = []
latencies = []

def worker():
    conn = None
    while True:
        job = jobs.get()
        if job is None:
            return
        kind, i = job
        path, headers, body = request(kind, i)
        started = time.monotonic()
        status = "error"
        for attempt in range(2):
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                status = response.status
                if kind == "disconnect":
                    # Read into the stream, then hang up.
                    response.read1(64)
                    conn.close(); conn = None
                    with lock: cut[kind] = cut.get(kind, 0) + 1
                    break
                try:
                    response.read()
                except http.client.IncompleteRead:
                    # The upstream reset mid-stream: tollgate ends the
                    # client's stream abnormally too.
                    conn.close(); conn = None
                    with lock: cut[kind] = cut.get(kind, 0) + 1
                    break
                if response.getheader("connection", "").lower() == "close":
                    conn.close(); conn = None
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                # Keep-alive connection closed between calls: retry once on a
                # new one (the call never reached tollgate's handler).
                if conn: conn.close()
                conn = None
                if attempt == 1:
                    with lock: errors.append(f"{kind}: {e!r}")
            except Exception as e:
                if conn: conn.close()
                conn = None
                with lock: errors.append(f"{kind}: {e!r}")
                break
        with lock:
            statuses[(kind, status)] = statuses.get((kind, status), 0) + 1
            latencies.append(time.monotonic() - started)

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
for t in threads: t.start()

samples = [(0.0, rss_kib())]
start = time.monotonic()
next_sample = 10.0
sent = 0
interval = 1.0 / rate
while True:
    now = time.monotonic() - start
    if now >= duration:
        break
    if now >= next_sample:
        samples.append((round(now), rss_kib()))
        next_sample += 10.0
    due = int(now / interval) + 1
    while sent < due:
        jobs.put((SEQ[sent % 100], sent))
        sent += 1
    time.sleep(min(interval, 0.05))
backlog = jobs.qsize()
for _ in threads: jobs.put(None)
for t in threads: t.join(60)
samples.append((round(time.monotonic() - start), rss_kib()))

def metrics_sum(text, name, label=None):
    """Sum of a counter's series; with `label`, a dict of sums by that label."""
    by = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key = None
            if label:
                m = re.search(label + r'="([^"]*)"', line)
                key = m.group(1) if m else None
            by[key] = by.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return by if label else by.get(None, 0.0)

c = http.client.HTTPConnection(*admin.rsplit(":", 1), timeout=10)
c.request("GET", "/metrics"); metrics = c.getresponse().read().decode()
calls_by_status = metrics_sum(metrics, "agent_calls_total", "status")
calls_total = sum(calls_by_status.values())
refusals = metrics_sum(metrics, "agent_budget_rejections_total")

os.kill(pid, signal.SIGTERM)
for _ in range(300):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    # Zombie until the shell reaps it: check the state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                break
    except FileNotFoundError:
        break
    time.sleep(0.1)
db = sqlite3.connect(f"{work}/ledger.db")
ledger = db.execute("SELECT COUNT(*) FROM calls WHERE release = 'soak'").fetchone()[0]
ledger_by = dict(db.execute("SELECT status, COUNT(*) FROM calls WHERE release = 'soak' GROUP BY status").fetchall())
ledger_outcomes = {(s, o): n for s, o, n in db.execute(
    "SELECT status, outcome, COUNT(*) FROM calls WHERE release = 'soak' GROUP BY status, outcome")}
log = open(f"{work}/tollgate.log", errors="replace").read() + open(f"{work}/tollgate.err", errors="replace").read()
panics = len(re.findall("panicked", log))

completed = sum(statuses.values())
unexpected = {f"{k}->{s}": n for (k, s), n in statuses.items() if EXPECT[k][0] != s}
sent_by_kind = {}
for (k, s), n in statuses.items():
    sent_by_kind[k] = sent_by_kind.get(k, 0) + n
# Per status: what the client saw, the ledger, and /metrics.
client_by_status = {}
for (k, s), n in statuses.items():
    client_by_status[s] = client_by_status.get(s, 0) + n
metrics_by_status = {int(s): int(n) for s, n in calls_by_status.items() if s}
metrics_by_status[402] = metrics_by_status.get(402, 0) + int(refusals)
# Per outcome: the ledger against what each kind should leave there.
expected_outcomes = {}
for k, n in sent_by_kind.items():
    expected_outcomes[EXPECT[k]] = expected_outcomes.get(EXPECT[k], 0) + n
# RSS: the second minute against the last one.
def mean_kib(lo, hi):
    xs = [k for t, k in samples if lo <= t <= hi]
    return sum(xs) / len(xs) if xs else None
end_t = samples[-1][0]
second_minute = mean_kib(60, 120)
last_minute = mean_kib(end_t - 60, end_t) if end_t >= 180 else None
latencies.sort()
p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
warm = samples[1][1] if len(samples) > 2 else samples[0][1]
print()
print(f"== soak report: {duration:.0f} s at {rate:g} req/s, {workers} client threads")
print(f"requests sent              {sent}  (completed {completed}, left in queue at the end {backlog})")
by_kind = {}
for (k, s), n in sorted(statuses.items(), key=str):
    by_kind.setdefault(k, []).append(f"{s}:{n}")
print("by kind                    " + ", ".join(f"{k} [{' '.join(v)}]" for k, v in by_kind.items()))
print(f"latency ms p50/p99/max     {p(0.5):.1f} / {p(0.99):.1f} / {p(1.0):.1f}")
print(f"ledger records             {ledger}  by status {dict(sorted(ledger_by.items()))}")
print(f"/metrics agent_calls_total {calls_total:.0f} + budget refusals {refusals:.0f} = {calls_total + refusals:.0f}")
print(f"by status: client          {dict(sorted(client_by_status.items(), key=str))}")
print(f"           ledger          {dict(sorted(ledger_by.items()))}")
print(f"           /metrics        {dict(sorted(metrics_by_status.items()))}")
print("ledger (status, outcome)   " + ", ".join(f"{s} {o}: {n}" for (s, o), n in sorted(ledger_outcomes.items())))
print(f"streams cut as injected    {dict(sorted(cut.items()))}")
print(f"client errors              {len(errors)} {errors[:3]}")
print(f"'panicked' in the log      {panics}")
print("RSS KiB (t s: KiB)         " + " ".join(f"{t}:{k}" for t, k in samples))
print(f"RSS growth after warm-up   {samples[-1][1] - warm:+d} KiB (from {warm} at {samples[1][0] if len(samples) > 2 else 0} s to {samples[-1][1]} at the end)")
if second_minute and last_minute:
    print(f"RSS mean, 2nd vs last min  {second_minute:.0f} KiB vs {last_minute:.0f} KiB ({(last_minute / second_minute - 1) * 100:+.1f}%)")
checks = {
    "sent = completed": sent == completed,
    "every status as expected": not unexpected and not errors,
    "sent = ledger records": sent == ledger,
    "ledger = calls_total + refusals": ledger == calls_total + refusals,
    "per status: client = ledger = /metrics": client_by_status == ledger_by == metrics_by_status,
    "per outcome: ledger as expected": expected_outcomes == ledger_outcomes,
    "every injected cut seen by the client": cut.get("reset", 0) == sent_by_kind.get("reset", 0)
        and cut.get("disconnect", 0) == sent_by_kind.get("disconnect", 0),
    "no panic": panics == 0,
}
if second_minute and last_minute:
    checks[f"RSS flat (last minute within {tolerance:g}% of the second)"] = \
        last_minute <= second_minute * (1 + tolerance / 100)
for name, ok in checks.items():
    print(f"  {'ok  ' if ok else 'FAIL'} {name}")
if unexpected:
    print(f"unexpected statuses: {unexpected}")
if expected_outcomes != ledger_outcomes:
    print(f"expected ledger outcomes: {dict(sorted(expected_outcomes.items()))}")
sys.exit(0 if all(checks.values()) else 1)
PY
