#!/usr/bin/env bash
# System calls per proxied call, counted by `strace -c -f`: which syscalls
# (and futex wake-ups between threads) a call costs, a figure that repeats
# on a busy machine.
#
# Starts examples/mock_upstream, nginx (with NGINX=1; its worker processes
# are traced), hyper-bare (examples/bare_proxy, with BARE=1) and tollgate
# (and BEFORE=<another tollgate binary>, same config);
# for each, sends WARMUP calls, attaches strace to every thread, sends CALLS
# calls (examples/loadgen, CONNECTIONS keep-alive connections, run id per
# connection), detaches and prints each syscall's count per call. With
# RATE=<calls/s> the calls are sent at that rate (open loop) instead of as
# fast as they are answered: the workers then park between calls, and
# wake-ups between threads show.
#
# SCENARIO=stream (or stream-paced, lib.sh) sends streamed calls (the mock's captured OpenAI stream,
# with its usage event) instead of JSON ones.
#
# Environment (defaults): SCENARIO=json CALLS=5000 WARMUP=500 CONNECTIONS=32
#   RATE= NGINX=0 BARE=1 TOLLGATE=target/dist/tollgate BEFORE= LEDGER=true
#   RUST_LOG=info

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CALLS=${CALLS:-5000}
WARMUP=${WARMUP:-500}
CONNECTIONS=${CONNECTIONS:-32}
NGINX=${NGINX:-0}
BARE=${BARE:-1}
LEDGER=${LEDGER:-true}
SCENARIO=${SCENARIO:-json}
set_scenario_flags "$SCENARIO"

command -v strace >/dev/null || {
    echo "strace is not installed (Debian: apt-get install strace)" >&2
    exit 2
}
harness_init syscalls-call
build_dist --example loadgen --example bare_proxy
tollgate_bin=${TOLLGATE:-$root/$bin/tollgate}
start_mock "$work" --threads 1

# Sends $2 calls to URL $1 (at RATE calls/s when it is set).
drive() {
    "$bin/examples/loadgen" --url "$1" --connections "$CONNECTIONS" ${RATE:+--rate "$RATE"} \
        --duration-secs 600 --requests "$2" --warmup-secs 0 --threads 1 \
        --header 'x-agent-run-id: sc-{conn}' --header 'x-agent-release: sc' \
        --label syscalls "${flags[@]}" >/dev/null
}

# Counts the syscalls of the processes $1 (pids, space-separated) over
# CALLS calls to URL $2 into $work/strace.$3.
measure() {
    local url=$2 name=$3 tracer pid attach=()
    for pid in $1; do attach+=(-p "$pid"); done
    drive "$url" "$WARMUP"
    strace -c -f "${attach[@]}" -o "$work/strace.$name" 2>/dev/null &
    tracer=$!
    # strace attaches to each thread before it reports; give it that time.
    sleep 1
    drive "$url" "$CALLS"
    kill -INT "$tracer"
    wait "$tracer" || true
}

names=()
if [[ $NGINX == 1 ]]; then
    start_nginx
    # The workers exist once a call has been answered.
    drive "http://$agent/openai/v1/chat/completions" 10
    measure "$(pgrep -P "${pids[-1]}" | tr '\n' ' ')" "http://$agent/openai/v1/chat/completions" nginx
    names+=(nginx)
fi
if [[ $BARE == 1 ]]; then
    start_bare_proxy
    measure "$bare_pid" "http://$bare_addr/openai/v1/chat/completions" hyper-bare
    names+=(hyper-bare)
fi
targets=("tollgate=$tollgate_bin")
[[ -n ${BEFORE:-} ]] && targets+=("tollgate-before=$BEFORE")
for target in "${targets[@]}"; do
    name=${target%%=*}
    write_tollgate_config "$work/$name.toml" "$mock_addr" <<EOF
[ledger]
enabled = $LEDGER
path = "$work/$name.db"
EOF
    start_tollgate_process "${target#*=}" "$work/$name" "${RUST_LOG:-info}"
    measure "$tollgate_pid" "http://$tollgate_agent/openai/v1/chat/completions" "$name"
    names+=("$name")
done

echo
echo "System calls per $SCENARIO call (strace -c -f, $CALLS calls after $WARMUP, $CONNECTIONS connections${RATE:+, $RATE calls/s}):"
echo
printf '| syscall |'
printf ' %s |' "${names[@]}"
printf '\n|---|'
printf -- '---:|%.0s' "${names[@]}"
echo
# strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall.
for name in "${names[@]}"; do
    awk -v n="$name" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {print n, $NF, $4}' "$work/strace.$name"
done | awk -v calls="$CALLS" -v list="${names[*]}" '
    { count[$2, $1] = $3; seen[$2] = 1; total[$1] += $3 }
    END {
        n = split(list, order, " ")
        line = "| all |"
        for (i = 1; i <= n; i++) line = line sprintf(" %.2f |", total[order[i]] / calls)
        print line
        for (s in seen) {
            line = "| " s " |"
            for (i = 1; i <= n; i++) line = line sprintf(" %.2f |", count[s, order[i]] / calls)
            print line
        }
    }' | sort -t'|' -k3 -rn
