#!/usr/bin/env bash
# Load test: the same calls sent straight to a mock upstream ("direct"),
# through nginx and through tollgate, interleaved, several rounds, on
# loopback.
#
# Builds the dist profile, starts examples/mock_upstream and target/dist/tollgate
# (with a generated config, both on port 0; the bound addresses are read
# from the mock's first stdout line and tollgate's "tollgate listening" log
# line) and nginx (generated config in the temp dir, on a free port found at
# run time), runs examples/loadgen for every (round, scenario, target), and
# prints a table of medians over the rounds with ratios against direct.
#
# Scenarios:
#   json          non-streaming chat completion (~2.7 KB JSON reply), closed
#                 loop: CONNECTIONS connections, one call in flight on each
#   stream        streamed chat completion asking for usage (38 SSE events)
#   stream-inject streamed, not asking for usage: tollgate adds
#                 stream_options.include_usage and strips the usage chunk
#   json-rate     the json call open loop at a fixed RATE (calls/s, well
#                 below saturation): latency counts from the scheduled send,
#                 so the added p50/p99 are the proxy's own latency
#   stream-paced  the stream call with the mock pausing PACE_US between
#                 events (request header x-mock-chunk-delay-us), started
#                 open loop at PACED_RATE streams/s, spread evenly over the
#                 connections (each starts one every CONNECTIONS/PACED_RATE
#                 s; by default every 50 × PACE_US, 1 s, longer than a
#                 paced stream's 37 pauses, 0.74 s): TTFB overhead and the
#                 gaps between body frames as the client sees them, direct
#                 vs proxied. Started back to back instead, streams of one
#                 length keep the connections in step, and every first byte
#                 would be one of a burst of CONNECTIONS requests at once
#
# Targets: direct; nginx (NGINX=1, default: proxy_pass to the mock through an
# upstream keepalive pool of 64, HTTP/1.1 upstream, proxy_buffering off,
# access log on, worker_processes = NGINX_WORKERS, default nproc, which is
# the number of worker threads tollgate's runtime starts); hyper-bare (BARE=1,
# default: examples/bare_proxy, hyper's server and pooled client forwarding
# each call and doing nothing else: the floor for a hyper-based proxy);
# tollgate (shipped
# logging: one JSON line per call, the ledger on); with NO_LEDGER=1 (default)
# tollgate-no-ledger (the same with `[ledger] enabled = false`) and, with
# QUIET=1, tollgate-quiet (a further instance with the per-call log line off:
# RUST_LOG=info,tollgate::call=off); with BEFORE=<path of another tollgate
# binary>, tollgate-before (that binary, same config as tollgate: a before /
# after comparison of a change within one run). The ledger on/off table
# also gives the CPU of tollgate's ledger writer thread per call, which
# the throughput ratio, noisy on a shared machine, does not isolate, and
# the machine's idle time per call with the ledger on and off (idle cores
# while calls wait: threads waiting on each other, not on the CPU).
#
# Environment (defaults): CONNECTIONS=32 DURATION=10 WARMUP=1 ROUNDS=3
#   SCENARIOS="json stream stream-inject json-rate stream-paced" RATE=500
#   PACE_US=20000 PACED_RATE=<CONNECTIONS / (50 × PACE_US)> CHUNK_DELAY_US=0
#   NGINX=1 BARE=1 NGINX_WORKERS=$(nproc) QUIET=0 NO_LEDGER=1
#   LOADGEN_THREADS=2 MOCK_THREADS=1 KEEP_AWAKE=0
#   TOLLGATE=target/dist/tollgate BEFORE= OUT=<temp dir>/results.jsonl
# KEEP_AWAKE=1 runs the paced scenarios (json-rate, stream-paced) beside one
# busy loop per core at the SCHED_IDLE policy, which any other thread
# should preempt at once: on a VM whose idle virtual CPUs wake late, the
# cores stay awake (CPU per call is each process's own time and
# unaffected; the machine's idle time is not reported for these
# scenarios). It can make the tails worse: on the VM of BENCHMARKS.md's
# twenty-sixth round, a thread woken onto a core running a loop at times
# waited 4–5 ms (about a scheduler tick) before it ran, for every target
# (scripts/wakeup-delays.sh shows such waits); there the p99s are measured
# without the loops.
# Every measurement is bounded (WARMUP + DURATION + 5 s grace, and killed
# after 30 s more); everything started here is stopped on exit.

set -euo pipefail

CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"json stream stream-inject json-rate stream-paced"}
RATE=${RATE:-500}
PACE_US=${PACE_US:-20000}
CHUNK_DELAY_US=${CHUNK_DELAY_US:-0}
NGINX=${NGINX:-1}
BARE=${BARE:-1}
NGINX_WORKERS=${NGINX_WORKERS:-$(nproc)}
QUIET=${QUIET:-0}
NO_LEDGER=${NO_LEDGER:-1}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
MOCK_THREADS=${MOCK_THREADS:-1}
KEEP_AWAKE=${KEEP_AWAKE:-0}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
harness_init load
OUT=${OUT:-$work/results.jsonl}

print_load_average "at the start"
build_dist --example loadgen --example bare_proxy

tollgate_bin=${TOLLGATE:-$bin/tollgate}

start_mock "$work" --threads "$MOCK_THREADS" --chunk-delay-us "$CHUNK_DELAY_US"
echo "mock upstream on $mock_addr" >&2

# Starts a tollgate instance named $1 with RUST_LOG=$2, the ledger on
# unless $3 is false, binary $4 (default $tollgate_bin); sets $agent to its
# bound agent address.
start_tollgate() {
    local name=$1 filter=$2 ledger=${3:-true} binary=${4:-$tollgate_bin}
    write_tollgate_config "$work/$name.toml" "$mock_addr" <<EOF
[ledger]
enabled = $ledger
path = "$work/$name.db"
EOF
    start_tollgate_process "$binary" "$work/$name" "$filter"
    agent=$tollgate_agent
}

declare -A url pid_of
url[direct]="http://$mock_addr/v1/chat/completions"
pid_of[direct]=$mock_pid
targets=(direct)
if [[ $NGINX == 1 ]]; then
    start_nginx
    url[nginx]="http://$agent/openai/v1/chat/completions"
    pid_of[nginx]=${pids[-1]}
    targets+=(nginx)
    echo "nginx on $agent ($NGINX_WORKERS worker processes)" >&2
fi
if [[ $BARE == 1 ]]; then
    start_bare_proxy
    url[hyper-bare]="http://$bare_addr/openai/v1/chat/completions"
    pid_of[hyper-bare]=$bare_pid
    targets+=(hyper-bare)
fi
targets+=(tollgate)
start_tollgate tollgate info
url[tollgate]="http://$agent/openai/v1/chat/completions"
pid_of[tollgate]=$tollgate_pid
echo "tollgate on $agent" >&2
if [[ -n ${BEFORE:-} ]]; then
    start_tollgate tollgate-before info true "$BEFORE"
    url[tollgate-before]="http://$agent/openai/v1/chat/completions"
    pid_of[tollgate-before]=$tollgate_pid
    targets+=(tollgate-before)
    echo "tollgate-before ($BEFORE) on $agent" >&2
fi
if [[ $NO_LEDGER == 1 ]]; then
    start_tollgate tollgate-no-ledger info false
    url[tollgate-no-ledger]="http://$agent/openai/v1/chat/completions"
    pid_of[tollgate-no-ledger]=$tollgate_pid
    targets+=(tollgate-no-ledger)
    echo "tollgate-no-ledger on $agent" >&2
fi
if [[ $QUIET == 1 ]]; then
    start_tollgate tollgate-quiet 'info,tollgate::call=off'
    url[tollgate-quiet]="http://$agent/openai/v1/chat/completions"
    pid_of[tollgate-quiet]=$tollgate_pid
    targets+=(tollgate-quiet)
    echo "tollgate-quiet on $agent" >&2
fi

: >"$OUT"
TICK=$(getconf CLK_TCK)
# Idle ticks of the whole machine (all cores): with the cores shared by
# the load generator, the mock and the proxy, a target that leaves them
# idle while calls wait has its threads waiting on each other.
idle_ticks() {
    awk '/^cpu /{ print $5 }' /proc/stat
}
set_paced_args
limit=$(python3 -c 'import math,sys; print(math.ceil(sum(map(float,sys.argv[1:])) + 35))' "$WARMUP" "$DURATION")
for round in $(seq "$ROUNDS"); do
    # Alternate the order of the targets from round to round.
    order=("${targets[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[$i]}"); done
    fi
    for scenario in $SCENARIOS; do
        case $scenario in
        json) flags=() ;;
        stream) flags=(--stream --include-usage) ;;
        stream-inject) flags=(--stream) ;;
        json-rate) flags=(--rate "$RATE") ;;
        stream-paced) flags=("${paced_args[@]}") ;;
        *)
            echo "unknown scenario $scenario" >&2
            exit 2
            ;;
        esac
        if [[ $KEEP_AWAKE == 1 && ($scenario == json-rate || $scenario == stream-paced) ]]; then
            keep_awake
        fi
        for target in "${order[@]}"; do
            mock_before=$(cpu_ticks "$mock_pid")
            proxy_before=$(cpu_ticks "${pid_of[$target]}")
            ledger_before=$(thread_ticks "${pid_of[$target]}" tollgate-ledger)
            idle_before=$(idle_ticks)
            line=$(timeout "$limit" "$bin/examples/loadgen" --url "${url[$target]}" \
                --connections "$CONNECTIONS" --duration-secs "$DURATION" \
                --warmup-secs "$WARMUP" --threads "$LOADGEN_THREADS" \
                --header 'x-agent-run-id: load-{conn}' --header 'x-agent-release: load' \
                --label "$round $scenario $target" "${flags[@]}")
            line=$(python3 - "$line" "$(cpu_ticks "$mock_pid")" "$mock_before" \
                "$(cpu_ticks "${pid_of[$target]}")" "$proxy_before" "$target" "$TICK" \
                "$(thread_ticks "${pid_of[$target]}" tollgate-ledger)" "$ledger_before" \
                "$(idle_ticks)" "$idle_before" "${#awake[@]}" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
m1, m0, p1, p0 = map(int, sys.argv[2:6])
target, tick = sys.argv[6], int(sys.argv[7])
l1, l0 = map(int, sys.argv[8:10])
i1, i0 = map(int, sys.argv[10:12])
busy_loops = int(sys.argv[12])
calls = r["requests"] + r["warmup_requests"]
r["mock_cpu_us_per_call"] = round((m1 - m0) * 1e6 / tick / calls, 1) if calls else None
r["proxy_cpu_us_per_call"] = (
    None if target == "direct" or not calls else round((p1 - p0) * 1e6 / tick / calls, 1))
r["ledger_cpu_us_per_call"] = (
    round((l1 - l0) * 1e6 / tick / calls, 1) if target.startswith("tollgate") and calls else None)
r["machine_idle_us_per_call"] = (
    round((i1 - i0) * 1e6 / tick / calls, 1) if calls and not busy_loops else None)
r["kept_awake"] = busy_loops > 0
print(json.dumps(r))
EOF
)
            echo "$line" >>"$OUT"
            python3 - "$line" <<'EOF' >&2
import json, sys
r = json.loads(sys.argv[1])
l = r["latency_ms"] or {}
print(f'{r["label"]:<30} {r["rps"]:>9.0f} req/s  p50 {l.get("p50")} ms  '
      f'p99 {l.get("p99")} ms  errors {r["errors"]} non-2xx {r["non_2xx"]}')
EOF
        done
        let_sleep
    done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    rnd, scenario, target = r["label"].split()
    by.setdefault((scenario, target), {})[int(rnd)] = r

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"

def rng(xs, nd):
    xs = [x for x in xs if x is not None]
    return f"{f(med(xs), nd)} [{f(min(xs), nd)}–{f(max(xs), nd)}]" if xs else "-"

def q(r, key, p):
    return (r.get(key) or {}).get(p)

scenarios = list(dict.fromkeys(k[0] for k in by))
targets = list(dict.fromkeys(k[1] for k in by))
print("| scenario | target | req/s | p50 ms | p90 ms | p99 ms | TTFB p50 ms | TTFB p99 ms | chunk p99 ms | proxy CPU µs/call | mock CPU µs/call | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scenarios:
    for t in targets:
        runs = by.get((s, t), {}).values()
        g = lambda k, p: med([q(r, k, p) for r in runs])
        print(f"| {s} | {t} | {f(med([r['rps'] for r in runs]), 0)} | {f(g('latency_ms','p50'))} "
              f"| {f(g('latency_ms','p90'))} | {f(g('latency_ms','p99'))} | {f(g('ttfb_ms','p50'))} "
              f"| {f(g('ttfb_ms','p99'))} | {f(g('chunk_delay_ms','p99'))} "
              f"| {f(med([r.get('proxy_cpu_us_per_call') for r in runs]), 0)} "
              f"| {f(med([r.get('mock_cpu_us_per_call') for r in runs]), 0)} "
              f"| {sum(r['errors'] + r['non_2xx'] for r in runs)} |")

def per_round(s, t, base, fn):
    """fn(r, b) for every round where both t and base ran."""
    b_runs = by.get((s, base), {})
    out = []
    for rnd, r in by.get((s, t), {}).items():
        b = b_runs.get(rnd)
        if b:
            out.append(fn(r, b))
    return out

closed = [s for s in scenarios if s in ("json", "stream", "stream-inject")]
if closed:
    print()
    print("Throughput, per round against the run of the same round (median over rounds;")
    print("range in brackets):")
    print()
    print("| scenario | target | vs direct | vs nginx | added p50 ms | added p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for s in closed:
        for t in targets:
            if t == "direct":
                continue
            ratio = lambda r, b: r["rps"] / b["rps"] if b["rps"] else None
            vs_nginx = (per_round(s, t, "nginx", ratio)
                        if t != "nginx" and "nginx" in targets else [])
            d50 = per_round(s, t, "direct", lambda r, b: q(r, "latency_ms", "p50") - q(b, "latency_ms", "p50"))
            d99 = per_round(s, t, "direct", lambda r, b: q(r, "latency_ms", "p99") - q(b, "latency_ms", "p99"))
            print(f"| {s} | {t} | {rng(per_round(s, t, 'direct', ratio), 3)} | {rng(vs_nginx, 3)} "
                  f"| {rng(d50, 2)} | {rng(d99, 2)} |")

def diff_us(key, p):
    def fn(r, b):
        x, y = q(r, key, p), q(b, key, p)
        return None if x is None or y is None else (x - y) * 1000
    return fn

paced = [s for s in scenarios if s in ("json-rate", "stream-paced")]
if paced:
    print()
    print("Latency added against direct, in µs: a percentile of the proxied run minus the")
    print("same percentile of the direct run of the same round (median over rounds; range).")
    print("gap = time between consecutive body frames of a reply, as the client sees them;")
    print("chunk = time from the mock's write of a chunk (its `: sent_us=` stamp) to its")
    print("arrival at the client.")
    print()
    print("| scenario | target | latency p50 | latency p99 | TTFB p50 | TTFB p99 | gap p50 | gap p99 | gap max | chunk p50 | chunk p99 | chunk p99.9 | chunk max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in paced:
        for t in targets:
            if t == "direct":
                continue
            cols = [rng(per_round(s, t, "direct", diff_us(k, p)), 0) for k, p in [
                ("latency_ms", "p50"), ("latency_ms", "p99"), ("ttfb_ms", "p50"), ("ttfb_ms", "p99"),
                ("gap_ms", "p50"), ("gap_ms", "p99"), ("gap_ms", "max"),
                ("chunk_delay_ms", "p50"), ("chunk_delay_ms", "p99"), ("chunk_delay_ms", "p999"),
                ("chunk_delay_ms", "max")]]
            print(f"| {s} | {t} | " + " | ".join(cols) + " |")
    for s in paced:
        late = {t: sum(r.get("late_sends", 0) for r in by.get((s, t), {}).values()) for t in targets}
        if any(late.values()):
            print(f"\n{s}: sends that left > 2 ms behind schedule: {late}")

if "tollgate-before" in targets:
    print()
    print("After / before (tollgate / tollgate-before, per round):")
    print()
    print("| scenario | throughput ratio | CPU per call ratio | p50 ratio | p99 ratio |")
    print("|---|---:|---:|---:|---:|")
    for s in scenarios:
        ratio = lambda k: (lambda r, o: r[k] / o[k] if r.get(k) and o.get(k) else None)
        pq = lambda p: (lambda r, o: q(r, "latency_ms", p) / q(o, "latency_ms", p))
        print(f"| {s} | {rng(per_round(s, 'tollgate', 'tollgate-before', ratio('rps')), 3)} "
              f"| {rng(per_round(s, 'tollgate', 'tollgate-before', ratio('proxy_cpu_us_per_call')), 3)} "
              f"| {rng(per_round(s, 'tollgate', 'tollgate-before', pq('p50')), 3)} "
              f"| {rng(per_round(s, 'tollgate', 'tollgate-before', pq('p99')), 3)} |")

if "tollgate-no-ledger" in targets:
    print()
    print("Ledger on vs off (tollgate / tollgate-no-ledger, per round):")
    print()
    print("| scenario | throughput ratio | CPU per call ratio | p50 ratio | p99 ratio | ledger thread CPU µs/call | machine idle µs/call, on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in scenarios:
        rr = per_round(s, "tollgate", "tollgate-no-ledger",
                       lambda r, o: r["rps"] / o["rps"] if o["rps"] else None)
        r50 = per_round(s, "tollgate", "tollgate-no-ledger",
                        lambda r, o: q(r, "latency_ms", "p50") / q(o, "latency_ms", "p50"))
        r99 = per_round(s, "tollgate", "tollgate-no-ledger",
                        lambda r, o: q(r, "latency_ms", "p99") / q(o, "latency_ms", "p99"))
        rc = per_round(s, "tollgate", "tollgate-no-ledger",
                       lambda r, o: r["proxy_cpu_us_per_call"] / o["proxy_cpu_us_per_call"]
                       if r.get("proxy_cpu_us_per_call") and o.get("proxy_cpu_us_per_call") else None)
        lt = [r.get("ledger_cpu_us_per_call") for r in by.get((s, "tollgate"), {}).values()]
        idle = [med([r.get("machine_idle_us_per_call") for r in by.get((s, t), {}).values()])
                for t in ("tollgate", "tollgate-no-ledger")]
        print(f"| {s} | {rng(rr, 3)} | {rng(rc, 3)} | {rng(r50, 3)} | {rng(r99, 3)} | {rng(lt, 1)} "
              f"| {f(idle[0], 1)} / {f(idle[1], 1)} |")
EOF
print_load_average "at the end"
echo "raw results: $OUT (removed on exit unless OUT is set)" >&2
