#!/usr/bin/env bash
# Instructions per proxied call, counted by callgrind: a figure that repeats
# on a busy machine, where wall-clock and CPU-time figures do not.
#
# Starts examples/mock_upstream, then each proxy in turn under
# `valgrind --tool=callgrind` with instrumentation off; sends WARMUP calls,
# switches instrumentation on, sends CALLS calls (examples/loadgen,
# CONNECTIONS keep-alive connections, run id per connection), waits for
# the ledger's batch, switches it off and dumps. User-space instructions
# only (the kernel's share is not counted); every thread of the process
# (runtime workers, ledger writer) is included.
#
# Proxies: tollgate (TOLLGATE, default target/dist/tollgate; with
# BEFORE=<another tollgate binary> that one too, same config); with BARE=1
# (default), examples/bare_proxy: hyper forwarding and nothing else; with
# NGINX=1, nginx (load.sh's configuration, served from one process).
# Prints instructions per call for each, and with TOP=n (default 25) the n
# functions with the most inclusive instructions in tollgate's own code.
#
# PROVIDER=anthropic or gemini: the mock serves that provider's captured
# replies (tests/fixtures/providers) and the calls go to a route of that
# kind (tollgate only; BARE is then ignored).
#
# Environment (defaults): SCENARIO=json (or stream, stream-paced) CALLS=2000 WARMUP=200
#   CONNECTIONS=4 BARE=1 NGINX=0 TOP=25 TOLLGATE=target/dist/tollgate BEFORE=
#   LEDGER=true PROVIDER=openai
# Output files (callgrind.<name>.out) stay in the work directory with KEEP=1.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIO=${SCENARIO:-json}
CALLS=${CALLS:-2000}
WARMUP=${WARMUP:-200}
CONNECTIONS=${CONNECTIONS:-4}
BARE=${BARE:-1}
NGINX=${NGINX:-0}
TOP=${TOP:-25}
LEDGER=${LEDGER:-true}

harness_init callgrind-call
[[ ${KEEP:-0} == 1 ]] && keep_work=1
build_dist --example loadgen --example bare_proxy
tollgate_bin=${TOLLGATE:-$root/$bin/tollgate}
set_scenario_flags "$SCENARIO"
set_mock_provider_args "${PROVIDER:-openai}"
case ${PROVIDER:-openai} in
openai) path=/openai/v1/chat/completions ;;
anthropic) path=/upstream/v1/messages ;;
gemini)
    path=/upstream/v1beta/models/gemini-2.0-flash:generateContent
    [[ $SCENARIO == stream* ]] && path=/upstream/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse
    ;;
esac
[[ ${PROVIDER:-openai} == openai ]] || BARE=0 NGINX=0
start_mock "$work" --threads 1 "${mock_provider_args[@]}"

# Sends $2 calls to URL $1.
drive() {
    "$bin/examples/loadgen" --url "$1" --connections "$CONNECTIONS" \
        --duration-secs 600 --requests "$2" --warmup-secs 0 --threads 1 \
        --header 'x-agent-run-id: cg-{conn}' --header 'x-agent-release: cg' \
        --label callgrind "${flags[@]}" >/dev/null
}

# Counts process $1's instructions over CALLS calls to URL $2 into
# $work/callgrind.$3.out; prints the total.
measure() {
    local pid=$1 url=$2 name=$3
    drive "$url" "$WARMUP"
    callgrind_control -i on "$pid" >/dev/null
    drive "$url" "$CALLS"
    sleep 1 # the ledger writer commits its batch
    callgrind_control -i off "$pid" >/dev/null
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    callgrind_annotate "$work/callgrind.$name.out".* 2>/dev/null |
        awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

# valgrind in front of a binary, for start_tollgate_process.
vg_wrapper() {
    local wrapper=$work/valgrind-$1
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=%s "%s" "$@"\n' \
        "$work/callgrind.$1.out" "$2" >"$wrapper"
    chmod +x "$wrapper"
    echo "$wrapper"
}

declare -A per_call
names=()
if [[ $NGINX == 1 ]]; then
    NGINX_MASTER=off start_nginx valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$work/callgrind.nginx.out"
    total=$(measure "${pids[-1]}" "http://$agent/openai/v1/chat/completions" nginx)
    per_call[nginx]=$((total / CALLS))
    names+=(nginx)
fi
if [[ $BARE == 1 ]]; then
    start_bare_proxy valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$work/callgrind.hyper-bare.out"
    total=$(measure "$bare_pid" "http://$bare_addr/openai/v1/chat/completions" hyper-bare)
    per_call[hyper-bare]=$((total / CALLS))
    names+=(hyper-bare)
fi
targets=("tollgate=$tollgate_bin")
[[ -n ${BEFORE:-} ]] && targets+=("tollgate-before=$BEFORE")
for target in "${targets[@]}"; do
    name=${target%%=*}
    binary=${target#*=}
    write_tollgate_config "$work/$name.toml" "$mock_addr" <<EOF
[[routes]]
name = "upstream"
prefix = "/upstream"
upstream = "http://$mock_addr"
kind = "${PROVIDER:-openai}"

[ledger]
enabled = $LEDGER
path = "$work/$name.db"
EOF
    start_tollgate_process "$(vg_wrapper "$name" "$binary")" "$work/$name" info
    total=$(measure "$tollgate_pid" "http://$tollgate_agent$path" "$name")
    per_call[$name]=$((total / CALLS))
    names+=("$name")
done

echo
echo "Instructions per ${PROVIDER:-openai} $SCENARIO call (callgrind, $CALLS calls after $WARMUP, $CONNECTIONS connections):"
echo
echo "| proxy | instructions per call |"
echo "|---|---:|"
for name in "${names[@]}"; do
    echo "| $name | ${per_call[$name]} |"
done
if [[ $TOP -gt 0 ]]; then
    echo
    echo "tollgate's own functions, inclusive instructions per call:"
    # (read whole, then cut: an early exit would end the pipe with SIGPIPE)
    callgrind_annotate --inclusive=yes "$work/callgrind.tollgate.out".* 2>/dev/null |
        sed -nE 's|^ *([0-9,]+) \( *[0-9.]+%\) +/.*/src/([a-z_/]+\.rs):(tollgate::[^ ]*).*$|\1 src/\2 \3|p' |
        awk -v calls="$CALLS" '!seen[$3]++ {gsub(",", "", $1); printf "%8d  %s %s\n", $1 / calls, $2, $3}' |
        awk -v top="$TOP" 'NR <= top'
fi
