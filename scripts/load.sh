#!/usr/bin/env bash
# Load test: the same calls sent straight to a mock upstream ("direct") and
# through tollgate ("tollgate"), interleaved, several rounds, on loopback.
#
# Builds release, starts examples/mock_upstream and target/release/tollgate
# (with a generated config, both on port 0; the bound addresses are read
# from the mock's first stdout line and tollgate's "tollgate listening" log
# line), runs examples/loadgen for every (round, scenario, target), and prints
# a table of medians over the rounds with tollgate/direct ratios.
#
# Scenarios:
#   json          non-streaming chat completion (~2.7 KB JSON reply)
#   stream        streamed chat completion asking for usage (38 SSE events)
#   stream-inject streamed, not asking for usage: tollgate adds
#                 stream_options.include_usage and strips the usage chunk
#
# Targets: direct, tollgate (shipped logging: one JSON line per call, the
# ledger on), with NO_LEDGER=1 (default) tollgate-no-ledger (the same with
# `[ledger] enabled = false`) and, with QUIET=1 (default), tollgate-quiet (a
# further instance with the per-call log line off:
# RUST_LOG=info,tollgate::call=off).
#
# Environment (defaults): CONNECTIONS=32 DURATION=10 WARMUP=1 ROUNDS=3
#   SCENARIOS="json stream stream-inject" CHUNK_DELAY_US=0 QUIET=1 NO_LEDGER=1
#   LOADGEN_THREADS=2 MOCK_THREADS=1 OUT=<temp dir>/results.jsonl
# Every measurement is bounded (WARMUP + DURATION + 5 s grace, and killed
# after 30 s more); everything started here is stopped on exit.

set -euo pipefail

CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"json stream stream-inject"}
CHUNK_DELAY_US=${CHUNK_DELAY_US:-0}
QUIET=${QUIET:-1}
NO_LEDGER=${NO_LEDGER:-1}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
MOCK_THREADS=${MOCK_THREADS:-1}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

work=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-load.XXXXXX")
OUT=${OUT:-$work/results.jsonl}
pids=()

cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "building (release)..." >&2
cargo build --release --quiet --bin tollgate --example mock_upstream --example loadgen

bin=target/release
mock_out=$work/mock.out

"$bin/examples/mock_upstream" --listen 127.0.0.1:0 --threads "$MOCK_THREADS" \
    --chunk-delay-us "$CHUNK_DELAY_US" >"$mock_out" 2>"$work/mock.err" &
pids+=($!)

# Waits (at most 10 s) until file $1 has a line matching $2, prints it.
wait_line() {
    local file=$1 pattern=$2 i
    for i in $(seq 100); do
        if grep -m1 -- "$pattern" "$file" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for '$pattern' in $file:" >&2
    cat "$file" >&2 || true
    return 1
}

mock_addr=$(wait_line "$mock_out" '^127\.')
echo "mock upstream on $mock_addr" >&2

# Starts a tollgate instance named $1 with RUST_LOG=$2; sets $agent to its
# bound agent address. (Not run in a subshell: the pid must reach $pids.)
start_tollgate() {
    local name=$1 filter=$2 ledger=${3:-true} config=$work/$1.toml log=$work/$1.log
    cat >"$config" <<EOF
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "openai"
prefix = "/openai"
upstream = "http://$mock_addr"
kind = "openai"

[pricing]
files = ["$root/config/pricing.toml"]

[budget]
default_run_usd = 100000.0
max_run_usd = 100000.0

[ledger]
enabled = $ledger
path = "$work/$name.db"
EOF
    RUST_LOG=$filter "$bin/tollgate" --config "$config" >"$log" 2>"$work/$name.err" &
    pids+=($!)
    local line
    line=$(wait_line "$log" '"tollgate listening"')
    agent=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["agent"])' "$line")
}

declare -A url pid_of
url[direct]="http://$mock_addr/v1/chat/completions"
pid_of[direct]=${pids[0]}
targets=(direct tollgate)
start_tollgate tollgate info
url[tollgate]="http://$agent/openai/v1/chat/completions"
pid_of[tollgate]=${pids[-1]}
echo "tollgate on $agent" >&2
if [[ $NO_LEDGER == 1 ]]; then
    start_tollgate tollgate-no-ledger info false
    url[tollgate-no-ledger]="http://$agent/openai/v1/chat/completions"
    pid_of[tollgate-no-ledger]=${pids[-1]}
    targets+=(tollgate-no-ledger)
    echo "tollgate-no-ledger on $agent" >&2
fi
if [[ $QUIET == 1 ]]; then
    start_tollgate tollgate-quiet 'info,tollgate::call=off'
    url[tollgate-quiet]="http://$agent/openai/v1/chat/completions"
    pid_of[tollgate-quiet]=${pids[-1]}
    targets+=(tollgate-quiet)
    echo "tollgate-quiet on $agent" >&2
fi

: >"$OUT"
TICK=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
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
        *)
            echo "unknown scenario $scenario" >&2
            exit 2
            ;;
        esac
        for target in "${order[@]}"; do
            mock_before=$(cpu_ticks "${pids[0]}")
            proxy_before=$(cpu_ticks "${pid_of[$target]}")
            line=$(timeout "$limit" "$bin/examples/loadgen" --url "${url[$target]}" \
                --connections "$CONNECTIONS" --duration-secs "$DURATION" \
                --warmup-secs "$WARMUP" --threads "$LOADGEN_THREADS" \
                --header 'x-agent-run-id: load-{conn}' --header 'x-agent-release: load' \
                --label "$round $scenario $target" "${flags[@]}")
            line=$(python3 - "$line" "$(cpu_ticks "${pids[0]}")" "$mock_before" \
                "$(cpu_ticks "${pid_of[$target]}")" "$proxy_before" "$target" "$TICK" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
m1, m0, p1, p0 = map(int, sys.argv[2:6])
target, tick = sys.argv[6], int(sys.argv[7])
calls = r["requests"] + r["warmup_requests"]
r["mock_cpu_us_per_call"] = round((m1 - m0) * 1e6 / tick / calls, 1) if calls else None
r["proxy_cpu_us_per_call"] = (
    None if target == "direct" or not calls else round((p1 - p0) * 1e6 / tick / calls, 1))
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

scenarios = list(dict.fromkeys(k[0] for k in by))
targets = list(dict.fromkeys(k[1] for k in by))
print("| scenario | target | req/s | p50 ms | p90 ms | p99 ms | TTFB p50 ms | TTFB p99 ms | proxy CPU µs/call | mock CPU µs/call | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scenarios:
    for t in targets:
        runs = by.get((s, t), {}).values()
        g = lambda k, q: med([(r.get(k) or {}).get(q) for r in runs])
        print(f"| {s} | {t} | {f(med([r['rps'] for r in runs]), 0)} | {f(g('latency_ms','p50'))} "
              f"| {f(g('latency_ms','p90'))} | {f(g('latency_ms','p99'))} | {f(g('ttfb_ms','p50'))} "
              f"| {f(g('ttfb_ms','p99'))} | {f(med([r.get('proxy_cpu_us_per_call') for r in runs]), 0)} "
              f"| {f(med([r.get('mock_cpu_us_per_call') for r in runs]), 0)} "
              f"| {sum(r['errors'] + r['non_2xx'] for r in runs)} |")
print()
print("Ratios per round against the direct run of the same round (median over rounds;")
print("range in brackets):")
print()
print("| scenario | target | throughput vs direct | added p50 ms | added p99 ms | added TTFB p50 ms |")
print("|---|---|---:|---:|---:|---:|")
def rng(xs, nd):
    xs = [x for x in xs if x is not None]
    return f"{f(med(xs), nd)} [{f(min(xs), nd)}–{f(max(xs), nd)}]" if xs else "-"
for s in scenarios:
    direct = by.get((s, "direct"), {})
    for t in targets:
        if t == "direct":
            continue
        ratios, d50, d99, dt = [], [], [], []
        for rnd, r in by.get((s, t), {}).items():
            d = direct.get(rnd)
            if not d:
                continue
            ratios.append(r["rps"] / d["rps"] if d["rps"] else None)
            d50.append(r["latency_ms"]["p50"] - d["latency_ms"]["p50"])
            d99.append(r["latency_ms"]["p99"] - d["latency_ms"]["p99"])
            if r.get("ttfb_ms") and d.get("ttfb_ms"):
                dt.append(r["ttfb_ms"]["p50"] - d["ttfb_ms"]["p50"])
        print(f"| {s} | {t} | {rng(ratios, 3)} | {rng(d50, 2)} | {rng(d99, 2)} | {rng(dt, 2)} |")
if "tollgate-no-ledger" in targets:
    print()
    print("Ledger on vs off (tollgate / tollgate-no-ledger, per round):")
    print()
    print("| scenario | throughput ratio | p50 ratio | p99 ratio |")
    print("|---|---:|---:|---:|")
    for s in scenarios:
        off = by.get((s, "tollgate-no-ledger"), {})
        rr, r50, r99 = [], [], []
        for rnd, r in by.get((s, "tollgate"), {}).items():
            o = off.get(rnd)
            if not o or not o["rps"]:
                continue
            rr.append(r["rps"] / o["rps"])
            r50.append(r["latency_ms"]["p50"] / o["latency_ms"]["p50"])
            r99.append(r["latency_ms"]["p99"] / o["latency_ms"]["p99"])
        print(f"| {s} | {rng(rr, 3)} | {rng(r50, 3)} | {rng(r99, 3)} |")
EOF
echo "raw results: $OUT (removed on exit unless OUT is set)" >&2
