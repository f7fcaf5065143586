#!/usr/bin/env bash
# Added latency of the Redis state backend against the memory backend, in
# the same run: two tollgate instances in front of one mock upstream, one
# with `[state] backend = "memory"`, one with `backend = "redis"` (a private
# redis-server on a free loopback port, no persistence), both with the
# ledger off so only the state backend differs. Each connection of the load
# generator is one run (`x-agent-run-id: state-{conn}`), so every call is a
# reserve and a settle of a live run.
#
# Scenarios, interleaved target by target, ROUNDS rounds (order alternating):
#   json       closed loop, CONNECTIONS connections, one call in flight on
#              each: throughput and latency under load
#   json-rate  open loop at RATE calls/s (below saturation): the latency the
#              backend adds to a call
#
# Prints a table of medians over the rounds with the Redis/memory ratios,
# and the Redis instance's round trips per call from
# `agent_state_round_trips_total{op}` over `agent_calls_total`.
#
# Environment (defaults): CONNECTIONS=32 DURATION=10 WARMUP=1 ROUNDS=3
#   RATE=500 SCENARIOS="json json-rate" LOADGEN_THREADS=2 MOCK_THREADS=1
#   REDIS_SERVER=redis-server OUT=<temp dir>/results.jsonl

set -euo pipefail

CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-500}
SCENARIOS=${SCENARIOS:-"json json-rate"}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
MOCK_THREADS=${MOCK_THREADS:-1}
REDIS_SERVER=${REDIS_SERVER:-redis-server}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
harness_init state-load
OUT=${OUT:-$work/results.jsonl}

command -v "$REDIS_SERVER" >/dev/null || {
    echo "$REDIS_SERVER not found (install redis-server)" >&2
    exit 2
}

print_load_average "at the start"
build_dist --example loadgen

start_mock "$work" --threads "$MOCK_THREADS"
echo "mock upstream on $mock_addr" >&2

redis_port=$(free_port)
"$REDIS_SERVER" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    if python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2); s.sendall(b"PING\r\n"); assert s.recv(16).startswith(b"+PONG")' \
        "$redis_port" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
echo "redis-server on 127.0.0.1:$redis_port" >&2

declare -A url admin
# Starts tollgate named $1 with the state section $2; records its addresses.
start_tollgate() {
    local name=$1 state=$2
    write_tollgate_config "$work/$name.toml" "$mock_addr" <<EOF
[ledger]
enabled = false

$state
EOF
    start_tollgate_process "$bin/tollgate" "$work/$name" info,tollgate::call=off
    url[$name]="http://$tollgate_agent/openai/v1/chat/completions"
    admin[$name]=$tollgate_admin
    echo "$name on ${url[$name]}" >&2
}

start_tollgate memory $'[state]\nbackend = "memory"'
start_tollgate redis "$(printf '[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s/0"\ntimeout_ms = 100\non_state_error = "fail_open"' "$redis_port")"
targets=(memory redis)

# Sum of the samples of metric $2 on instance $1 (labels ignored), or of
# those whose label set contains $3.
metric() {
    curl -fsS "http://${admin[$1]}/metrics" | python3 -c '
import sys
name, want = sys.argv[1], sys.argv[2]
total = 0.0
for line in sys.stdin:
    if line.startswith("#"):
        continue
    series, _, value = line.rpartition(" ")
    metric = series.split("{", 1)[0]
    if metric == name and want in series:
        total += float(value)
print(total)' "$2" "${3:-}"
}

: >"$OUT"
limit=$(python3 -c 'import math,sys; print(math.ceil(sum(map(float,sys.argv[1:])) + 35))' "$WARMUP" "$DURATION")
for round in $(seq "$ROUNDS"); do
    order=("${targets[@]}")
    if ((round % 2 == 0)); then
        order=(redis memory)
    fi
    for scenario in $SCENARIOS; do
        case $scenario in
        json) flags=() ;;
        json-rate) flags=(--rate "$RATE") ;;
        *)
            echo "unknown scenario $scenario" >&2
            exit 2
            ;;
        esac
        for target in "${order[@]}"; do
            line=$(timeout "$limit" "$bin/examples/loadgen" --url "${url[$target]}" \
                --connections "$CONNECTIONS" --duration-secs "$DURATION" \
                --warmup-secs "$WARMUP" --threads "$LOADGEN_THREADS" \
                --header 'x-agent-run-id: state-{conn}' --header 'x-agent-release: load' \
                --label "$round $scenario $target" "${flags[@]}")
            echo "$line" >>"$OUT"
            python3 - "$line" <<'EOF' >&2
import json, sys
r = json.loads(sys.argv[1])
l = r["latency_ms"] or {}
print(f'{r["label"]:<24} {r["rps"]:>9.0f} req/s  p50 {l.get("p50")} ms  '
      f'p99 {l.get("p99")} ms  errors {r["errors"]} non-2xx {r["non_2xx"]}')
EOF
        done
    done
done

# Let the last settlements leave the settle worker before counting.
sleep 1
calls=$(metric redis agent_calls_total)
reserve=$(metric redis agent_state_round_trips_total 'op="reserve"')
settle=$(metric redis agent_state_round_trips_total 'op="settle"')
all_trips=$(metric redis agent_state_round_trips_total)
errors=$(metric redis agent_state_errors_total)

python3 - "$OUT" "$calls" "$reserve" "$settle" "$all_trips" "$errors" <<'EOF'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
calls, reserve, settle, trips, errors = map(float, sys.argv[2:7])
by = {}
for r in rows:
    rnd, scenario, target = r["label"].split()
    by.setdefault((scenario, target), {})[int(rnd)] = r

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"

def q(r, p):
    return (r.get("latency_ms") or {}).get(p)

print("| scenario | backend | req/s | p50 ms | p90 ms | p99 ms | errors |")
print("|---|---|---:|---:|---:|---:|---:|")
for s in dict.fromkeys(k[0] for k in by):
    for t in ("memory", "redis"):
        runs = by.get((s, t), {}).values()
        print(f"| {s} | {t} | {f(med([r['rps'] for r in runs]), 0)} | {f(med([q(r,'p50') for r in runs]))} "
              f"| {f(med([q(r,'p90') for r in runs]))} | {f(med([q(r,'p99') for r in runs]))} "
              f"| {sum(r['errors'] + r['non_2xx'] for r in runs)} |")

print()
print("Redis against memory, per round (median over rounds [min–max]):")
print()
print("| scenario | throughput ratio | p50 ratio | p99 ratio | added p50 ms | added p99 ms |")
print("|---|---:|---:|---:|---:|---:|")
def per_round(s, fn):
    out = []
    for rnd, r in by.get((s, "redis"), {}).items():
        m = by.get((s, "memory"), {}).get(rnd)
        if m:
            out.append(fn(r, m))
    return out
def rng(xs, nd):
    xs = [x for x in xs if x is not None]
    return f"{f(med(xs), nd)} [{f(min(xs), nd)}–{f(max(xs), nd)}]" if xs else "-"
for s in dict.fromkeys(k[0] for k in by):
    print(f"| {s} | {rng(per_round(s, lambda r, m: r['rps'] / m['rps']), 3)} "
          f"| {rng(per_round(s, lambda r, m: q(r,'p50') / q(m,'p50')), 3)} "
          f"| {rng(per_round(s, lambda r, m: q(r,'p99') / q(m,'p99')), 3)} "
          f"| {rng(per_round(s, lambda r, m: q(r,'p50') - q(m,'p50')), 3)} "
          f"| {rng(per_round(s, lambda r, m: q(r,'p99') - q(m,'p99')), 3)} |")

print()
if calls:
    print(f"Redis instance: {calls:.0f} calls, round trips per call: reserve {reserve / calls:.3f}, "
          f"settle {settle / calls:.3f}, all operations {trips / calls:.3f}; state errors {errors:.0f}")
EOF
print_load_average "at the end"
