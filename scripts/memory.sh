#!/usr/bin/env bash
# Memory of the tollgate process (VmRSS, and its anonymous and file-backed
# parts, from /proc), on loopback, in two phases, each with its own mock
# upstream (examples/mock_upstream) and tollgate (dist profile, generated
# config, ports 0, ledger on):
#
#   runs  RUNS calls, each with a new x-agent-run-id, so RUNS runs are
#         tracked at once (runs.idle_timeout_secs is set past the test);
#         then STREAMS streamed calls held open together (the mock waits
#         10 minutes after each stream's first event). Prints RSS after
#         start, after the runs (with agent_active_runs from /metrics) and
#         with the streams open (with the count of client connections).
#   soak  SOAK_SECS of steady load: JSON_RATE json and STREAM_RATE streamed
#         calls per second (open loop, a new run id per call, runs idle
#         for 30 s are ended, so the run table is steady after the first
#         half minute); RSS sampled every 10 s; prints the samples and the
#         mean of the first and of the last minute.
#
# Environment (defaults): PHASES="runs soak" RUNS=100000 STREAMS=1000
#   SOAK_SECS=600 JSON_RATE=300 STREAM_RATE=30 TOLLGATE=target/dist/tollgate
#   RUN_ID='mem-{conn}-{seq}' (the runs phase's x-agent-run-id, a loadgen
#   template: 'mem-{conn}' makes 32 runs of the same calls, to tell the run
#   table's share from the rest)
#   SMAPS=0 (1: the runs phase also copies /proc/PID/smaps at each point into
#   the work directory, which is then kept, for a per-mapping account)
#   HEAP=0 (1: the runs phase also prints glibc's heap at each point, the
#   bytes its arenas hold, in use and free, from malloc_stats() called in
#   the process through gdb)
# Every load run is bounded in time; everything started here is stopped on
# exit.

set -euo pipefail

PHASES=${PHASES:-"runs soak"}
RUNS=${RUNS:-100000}
STREAMS=${STREAMS:-1000}
SOAK_SECS=${SOAK_SECS:-600}
SMAPS=${SMAPS:-0}
HEAP=${HEAP:-0}
if [[ $HEAP == 1 ]] && ! command -v gdb >/dev/null; then
    echo "HEAP=1 needs gdb (apt-get install gdb)" >&2
    exit 1
fi
RUN_ID=${RUN_ID:-'mem-{conn}-{seq}'}
JSON_RATE=${JSON_RATE:-300}
STREAM_RATE=${STREAM_RATE:-30}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
harness_init memory

build_dist --example loadgen
tollgate_bin=${TOLLGATE:-$bin/tollgate}
# Two sockets per open stream (client and upstream side) plus the ledger.
ulimit -n "$(ulimit -Hn)"

# With SMAPS=1, keeps the process's smaps as $work/smaps-$2.
keep_smaps() {
    [[ $SMAPS == 1 ]] || return 0
    cp "/proc/$1/smaps" "$work/smaps-$2"
    keep_work=1
}

# With HEAP=1, "arenas MB | in use | free" of glibc's heap in process $1
# (whose stderr is $2): malloc_stats() writes its totals there.
heap_row() {
    [[ $HEAP == 1 ]] || return 0
    local before
    before=$(wc -l <"$2")
    gdb -p "$1" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1
    tail -n +"$((before + 1))" "$2" | awk '
        /^Total/ { total = 1 }
        total && /system bytes/ { sys = $NF }
        total && /in use bytes/ { used = $NF }
        END { printf "%.1f | %.1f | %.1f", sys / 1e6, used / 1e6, (sys - used) / 1e6 }'
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# "RSS | anonymous | file-backed" in MiB: file pages are the binary's code
# and read-only data, anonymous ones the heap and stacks.
rss_row() {
    awk '/^(VmRSS|RssAnon|RssFile):/ { printf "%s%.1f", sep, $2 / 1024; sep = " | " }' "/proc/$1/status"
}

# Starts a mock and a tollgate for phase $1 with run idle timeout $2; sets
# $tollgate_pid, $agent and $admin.
start() {
    local idle=$2 dir=$work/$1
    mkdir -p "$dir"
    local mock_addr mock_pid
    start_mock "$dir" --threads 1
    write_tollgate_config "$dir/tollgate.toml" "$mock_addr" <<EOF
[runs]
idle_timeout_secs = $idle

[ledger]
path = "$dir/ledger.db"
EOF
    start_tollgate_process "$tollgate_bin" "$dir/tollgate"
    agent=$tollgate_agent
    admin=$tollgate_admin
}

metric() {
    python3 - "http://$admin/metrics" "$1" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
print(next((l.split()[-1] for l in text.splitlines() if l.startswith(sys.argv[2] + " ")), "?"))
EOF
}

# Client connections open on the agent port.
client_connections() {
    local port=${agent##*:}
    ss -Htn state established "( sport = :$port )" | wc -l
}

phase_runs() {
    echo "== runs: $RUNS runs, then $STREAMS open streams" >&2
    start runs 86400
    local url="http://$agent/openai/v1/chat/completions"
    local at_start
    at_start=$(rss_row "$tollgate_pid")
    local err=$work/runs/tollgate.err heap_start heap_runs heap_streams
    heap_start=$(heap_row "$tollgate_pid" "$err")
    keep_smaps "$tollgate_pid" start
    timeout 600 "$bin/examples/loadgen" --url "$url" --connections 32 \
        --requests "$RUNS" --duration-secs 300 --warmup-secs 0 \
        --header "x-agent-run-id: $RUN_ID" >"$work/runs.json"
    local after_runs active
    after_runs=$(rss_row "$tollgate_pid")
    heap_runs=$(heap_row "$tollgate_pid" "$err")
    keep_smaps "$tollgate_pid" runs
    active=$(metric agent_active_runs)
    # Each stream gets its first event, then the mock waits 10 minutes.
    timeout 120 "$bin/examples/loadgen" --url "$url" --connections "$STREAMS" \
        --duration-secs 60 --warmup-secs 0 --timeout-secs 90 --grace-secs 0 \
        --stream --include-usage --header 'x-mock-chunk-delay-us: 600000000' \
        --header 'x-agent-run-id: held-{conn}' >/dev/null &
    local held=$! open=0 _
    for _ in $(seq 300); do
        open=$(client_connections)
        ((open >= STREAMS)) && break
        sleep 0.2
    done
    sleep 2 # the streams' first events are through
    open=$(client_connections)
    local with_streams
    with_streams=$(rss_row "$tollgate_pid")
    heap_streams=$(heap_row "$tollgate_pid" "$err")
    keep_smaps "$tollgate_pid" streams
    kill "$held" 2>/dev/null || true
    wait "$held" 2>/dev/null || true
    python3 - "$work/runs.json" <<EOF
import json, sys
r = json.load(open(sys.argv[1]))
print(f"calls sent: {r['requests']} ({r['rps']:.0f}/s), errors {r['errors']}, non-2xx {r['non_2xx']}")
EOF
    if [[ $HEAP == 1 ]]; then
        echo "| point | tollgate RSS MiB | anonymous | file | heap arenas MB | in use | free |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        echo "| after start | $at_start | $heap_start |"
        echo "| $RUNS runs tracked (agent_active_runs $active) | $after_runs | $heap_runs |"
        echo "| and $open streams open | $with_streams | $heap_streams |"
        return
    fi
    echo "| point | tollgate RSS MiB | anonymous | file |"
    echo "|---|---:|---:|---:|"
    echo "| after start | $at_start |"
    echo "| $RUNS runs tracked (agent_active_runs $active) | $after_runs |"
    echo "| and $open streams open | $with_streams |"
}

phase_soak() {
    echo "== soak: $SOAK_SECS s at $JSON_RATE json + $STREAM_RATE stream calls/s" >&2
    start soak 30
    local url="http://$agent/openai/v1/chat/completions"
    timeout $((SOAK_SECS + 60)) "$bin/examples/loadgen" --url "$url" --connections 32 \
        --rate "$JSON_RATE" --duration-secs "$SOAK_SECS" --warmup-secs 0 \
        --header 'x-agent-run-id: soak-{conn}-{seq}' >"$work/soak-json.json" &
    local json_load=$!
    timeout $((SOAK_SECS + 60)) "$bin/examples/loadgen" --url "$url" --connections 16 \
        --rate "$STREAM_RATE" --duration-secs "$SOAK_SECS" --warmup-secs 0 --stream \
        --header 'x-agent-run-id: soak-stream-{conn}-{seq}' >"$work/soak-stream.json" &
    local stream_load=$!
    : >"$work/samples"
    local t
    for ((t = 10; t <= SOAK_SECS; t += 10)); do
        sleep 10
        echo "$t $(rss_kib "$tollgate_pid")" >>"$work/samples"
    done
    wait "$json_load" "$stream_load" || true
    python3 - "$work/samples" "$work/soak-json.json" "$work/soak-stream.json" <<'EOF'
import json, sys
samples = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
for path in sys.argv[2:]:
    r = json.load(open(path))
    print(f"{r['mode']}: {r['requests']} calls ({r['rps']:.1f}/s), errors {r['errors']}, "
          f"non-2xx {r['non_2xx']}, late sends {r['late_sends']}")
print("RSS samples (s: MiB): " + ", ".join(f"{t}: {k / 1024:.1f}" for t, k in samples))
first = [k for t, k in samples if t <= 60]
last = [k for t, k in samples if t > samples[-1][0] - 60]
mean = lambda xs: sum(xs) / len(xs) / 1024
minutes = {}
for t, k in samples:
    minutes.setdefault((t - 1) // 60, []).append(k)
print("mean per minute (MiB): " + ", ".join(f"{m + 1}: {mean(ks):.1f}" for m, ks in sorted(minutes.items())))
print(f"first minute mean {mean(first):.1f} MiB, last minute mean {mean(last):.1f} MiB, "
      f"change {mean(last) - mean(first):+.1f} MiB ({(mean(last) / mean(first) - 1) * 100:+.1f} %); "
      f"max {max(k for _, k in samples) / 1024:.1f} MiB")
EOF
}

print_load_average "at the start"
for phase in $PHASES; do
    "phase_$phase"
done
print_load_average "at the end"
