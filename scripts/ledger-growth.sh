#!/usr/bin/env bash
# Whether the ledger's cost grows with its file: one tollgate instance
# (ledger on unless LEDGER=false) under the load test's JSON load (32
# keep-alive connections, a run id per connection, back to back) for
# SLICES consecutive slices of SECS seconds, the ledger file never reset.
# Prints, per slice: calls/s, tollgate's CPU per call and the writer
# thread's (tollgate-ledger), the ledger's queue depth and backpressure
# waits (from /metrics), and the sizes of the ledger and log files.
# With LEDGER_URL=postgres://… the ledger is that PostgreSQL database
# instead of a SQLite file (its size is then not printed); the writer's CPU
# is then its two threads' (intake and writer).
#
# Environment (defaults): SLICES=8 SECS=10 CONNECTIONS=32 LEDGER=true
#   LEDGER_URL= TOLLGATE=target/dist/tollgate PREBUILT=0 KEEP=0 (1: keep the
#   work directory, with the ledger file)

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SLICES=${SLICES:-8}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-32}
LEDGER=${LEDGER:-true}
LEDGER_URL=${LEDGER_URL:-}

harness_init ledger-growth
[[ ${KEEP:-0} == 1 ]] && keep_work=1
build_dist --example loadgen
tollgate_bin=${TOLLGATE:-$root/$bin/tollgate}

start_mock "$work" --threads 1 --fixtures "$root/tests/fixtures/providers/openai"
if [[ -n $LEDGER_URL ]]; then
    ledger_location="backend = \"postgres\"
url = \"$LEDGER_URL\""
else
    ledger_location="path = \"$work/tollgate.db\""
fi
write_tollgate_config "$work/tollgate.toml" "$mock_addr" <<EOF
[ledger]
enabled = $LEDGER
$ledger_location
EOF
start_tollgate_process "$tollgate_bin" "$work/tollgate" info
print_load_average start

echo "| slice | calls/s | CPU µs/call | writer µs/call | queue depth | backpressure waits | ledger files MiB | log MiB |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for slice in $(seq "$SLICES"); do
    all_before=$(cpu_ticks "$tollgate_pid")
    writer_before=$(thread_ticks "$tollgate_pid" tollgate-ledger)
    line=$("$bin/examples/loadgen" --url "http://$tollgate_agent/openai/v1/chat/completions" \
        --connections "$CONNECTIONS" --duration-secs "$SECS" --warmup-secs 0 --threads 2 \
        --header 'x-agent-run-id: load-{conn}' --header 'x-agent-release: load' \
        --label "slice $slice")
    all_after=$(cpu_ticks "$tollgate_pid")
    writer_after=$(thread_ticks "$tollgate_pid" tollgate-ledger)
    metrics=$(curl -fsS "http://$tollgate_admin/metrics")
    ledger_mib=-
    [[ -n $LEDGER_URL || $LEDGER != true ]] ||
        ledger_mib=$(du -cm "$work"/tollgate.db* | awk 'END { print $1 }')
    log_mib=$(du -m "$work/tollgate.log" | awk '{ print $1 }')
    python3 - "$line" "$slice" "$(getconf CLK_TCK)" "$all_before" "$all_after" \
        "$writer_before" "$writer_after" "$ledger_mib" "$log_mib" "$metrics" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
slice_, tick = sys.argv[2], int(sys.argv[3])
a0, a1, w0, w1 = map(int, sys.argv[4:8])
ledger_mib, log_mib, metrics = sys.argv[8], sys.argv[9], sys.argv[10]
def metric(name):
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    return "-"
calls = r["requests"] + r["warmup_requests"]
per_call = lambda t: round(t * 1e6 / tick / calls, 1) if calls else "-"
print(f"| {slice_} | {round(r['rps'])} | {per_call(a1 - a0)} | {per_call(w1 - w0)} | "
      f"{metric('agent_ledger_queue_depth')} | {metric('agent_ledger_backpressure_waits')} | "
      f"{ledger_mib} | {log_mib} |")
EOF
done
print_load_average end
