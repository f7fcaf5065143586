#!/usr/bin/env bash
# Why a paced stream's first byte or a chunk arrives late: how long each
# thread on the path (load generator, proxy, mock) waited between being
# woken and running, recorded by `perf sched record` while paced streams
# run through one target.
#
# Starts examples/mock_upstream and TARGET: tollgate (target/dist/tollgate,
# or TOLLGATE), hyper-bare (examples/bare_proxy) or direct (the mock
# alone); with KEEP_AWAKE=1, one SCHED_IDLE busy loop per core as
# scripts/load.sh does. Then sends load.sh's stream-paced load
# (CONNECTIONS connections, PACED_RATE streams/s, PACE_US between events)
# for SECS seconds under `perf sched record`, and prints the load
# generator's TTFB and chunk percentiles and, per process, the wake-up
# delays (perf's "sch delay": from being woken, or preempted, to running)
# as p50, p99, p99.9, longest and how many exceeded 1 ms, split by what
# the core ran before the thread got it: a busy loop, nothing (idle) or
# another thread. A busy loop that a woken thread should preempt at once,
# yet ran for milliseconds first, shows in a process's "busy loop" row.
#
# Needs perf (Debian: linux-perf) and the sched tracepoints (root).
#
# Environment (defaults): TARGET=tollgate KEEP_AWAKE=0 SECS=10
#   CONNECTIONS=32 PACE_US=20000 PACED_RATE=<as load.sh's>
#   TOLLGATE=target/dist/tollgate

set -euo pipefail

TARGET=${TARGET:-tollgate}
KEEP_AWAKE=${KEEP_AWAKE:-0}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-32}
PACE_US=${PACE_US:-20000}

command -v perf >/dev/null || {
    echo "perf is not installed (Debian: apt-get install linux-perf)" >&2
    exit 2
}
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
harness_init wakeup-delays
build_dist --example loadgen --example bare_proxy

start_mock "$work" --threads 1
case $TARGET in
tollgate)
    write_tollgate_config "$work/tollgate.toml" "$mock_addr" </dev/null
    start_tollgate_process "${TOLLGATE:-$bin/tollgate}" "$work/tollgate"
    proxy_pid=$tollgate_pid
    addr=$tollgate_agent
    ;;
hyper-bare)
    start_bare_proxy
    proxy_pid=$bare_pid
    addr=$bare_addr
    ;;
direct)
    proxy_pid=
    addr=$mock_addr
    ;;
*)
    echo "unknown TARGET $TARGET (tollgate, hyper-bare or direct)" >&2
    exit 2
    ;;
esac
if [[ $KEEP_AWAKE == 1 ]]; then
    keep_awake
fi
set_paced_args

"$bin/examples/loadgen" --url "http://$addr/openai/v1/chat/completions" \
    --connections "$CONNECTIONS" --duration-secs "$SECS" --warmup-secs 1 --threads 2 \
    --header 'x-agent-run-id: wake-{conn}' "${paced_args[@]}" --label "$TARGET" >"$work/loadgen.json" &
loadgen_pid=$!
pids+=("$loadgen_pid")
# Record the measured part only: the warm-up second is left out.
sleep 1
perf sched record -o "$work/perf.data" -- sleep "$SECS" >/dev/null 2>&1
wait "$loadgen_pid"
perf sched timehist -i "$work/perf.data" >"$work/timehist.txt" 2>/dev/null

python3 - "$work/loadgen.json" "$work/timehist.txt" "$mock_pid" "$proxy_pid" \
    "$loadgen_pid" "$TARGET" "$KEEP_AWAKE" "${awake[*]}" <<'EOF'
import collections, json, re, sys
result = json.load(open(sys.argv[1]))
names = {sys.argv[3]: "mock", sys.argv[4]: sys.argv[6], sys.argv[5]: "loadgen"}
busy_loops = set(sys.argv[8].split())
ttfb, chunk = result["ttfb_ms"], result["chunk_delay_ms"]
print(f"{sys.argv[6]}, KEEP_AWAKE={sys.argv[7]}: {result['requests']} streams; "
      f"TTFB p50 {ttfb['p50']:.3f} ms, p99 {ttfb['p99']:.3f}, longest {ttfb['max']:.3f}; "
      f"chunk p50 {chunk['p50']:.3f} ms, p99 {chunk['p99']:.3f}, p99.9 {chunk['p999']:.3f}")
# timehist lines: time [cpu] comm[tid/pid] wait sch-delay run-time, one per
# switch away from a thread (the idle task's comm is "<idle>", no ids); the
# previous line of the same core says what ran there before it.
line = re.compile(r"^\s*[\d.]+\s+\[(\d+)\]\s+(\S.*?)(?:\[(\d+)(?:/(\d+))?\])?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
before_on = {}
delays = collections.defaultdict(list)
for text in open(sys.argv[2]):
    m = line.match(text)
    if not m:
        continue
    cpu, comm, tid, pid, _, delay, _ = m.groups()
    pid = pid or tid
    if pid in names:
        delays[(names[pid], before_on.get(cpu, "other"))].append(float(delay))
    before_on[cpu] = "busy loop" if pid in busy_loops else "idle" if comm == "<idle>" else "other"
print("wake-up delay, ms   | ran before  | wake-ups |   p50 |   p99 | p99.9 | longest | > 1 ms")
for (name, before), d in sorted(delays.items()):
    d.sort()
    n = len(d)
    at = lambda q: d[min(n - 1, int(n * q))]
    print(f"{name:<19} | {before:<11} | {n:>8} | {at(.5):.3f} | {at(.99):.3f} | "
          f"{at(.999):.3f} | {d[-1]:>7.3f} | {sum(x > 1 for x in d):>6}")
EOF
