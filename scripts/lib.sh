# shellcheck shell=bash
# What the perf and soak harnesses (load.sh, callgrind-call.sh,
# syscalls-call.sh, memory.sh, soak.sh and the others in scripts/) share: a
# work directory and the processes they started, both gone on exit; the
# dist build; the mock upstream and tollgate on port 0, with the bound
# addresses read back from their output, and nginx on a free port; CPU
# ticks of a process or of its named threads.
#
# Sourced, not run:  source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The functions that start a process append its pid to $pids and set
# globals, so call them directly, not in $(...) or a pipeline.

# The repository root; harness_init makes it the working directory.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where `cargo build --profile dist` leaves the binaries (relative to $root).
bin=target/dist

# Changes to $root, creates the work directory $work
# (${TMPDIR:-/tmp}/tollgate-$1.XXXXXX) and an empty $pids, and installs the
# exit trap (harness_cleanup). Set keep_work=1 afterwards to keep $work.
harness_init() {
    cd "$root" || exit
    work=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-$1.XXXXXX")
    pids=()
    keep_work=0
    trap harness_cleanup EXIT
    trap 'exit 130' INT TERM
}

# The exit trap: stops every process in $pids, waits for them, removes
# $work (or, with keep_work=1, says where it is) and exits with the
# script's status.
harness_cleanup() {
    local status=$? pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $keep_work == 1 ]]; then
        echo "work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}

# Prints "load average $1: <1, 5 and 15 minute figures>" on stderr.
print_load_average() {
    echo "load average $1: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

# Builds the tollgate binary and the harness's tools (build_dist_tools) with
# the dist profile (release with link-time optimisation, what production
# runs). PREBUILT=1 skips the build and uses what target/dist already holds
# (to measure binaries given as TOLLGATE= / BEFORE= without building the
# checkout first).
build_dist() {
    [[ ${PREBUILT:-0} == 1 ]] && return 0
    echo "building (dist profile; the first build takes minutes)..." >&2
    # tollgate alone, as users and the Docker image build it: built in one
    # command with the examples, it would get the features their
    # dependencies enable (a larger binary; BENCHMARKS.md, "Fifteenth round").
    cargo build --profile dist --locked --quiet --bin tollgate
    build_dist_tools "$@"
}

# Builds examples/mock_upstream with the dist profile, plus whatever else
# "$@" names (e.g. --example loadgen); PREBUILT=1 skips it.
build_dist_tools() {
    [[ ${PREBUILT:-0} == 1 ]] && return 0
    cargo build --profile dist --locked --quiet --example mock_upstream "$@"
}

# Waits (at most WAIT_SECS, default 10 s) until file $1 has a line matching
# $2 and prints it; on timeout says so on stderr with the file's content and
# fails.
wait_line() {
    local file=$1 pattern=$2 _
    for _ in $(seq $((${WAIT_SECS:-10} * 10))); do
        if grep -m1 -- "$pattern" "$file" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for '$pattern' in $file:" >&2
    cat "$file" >&2 || true
    return 1
}

# utime + stime of process $1 and its child processes (nginx's workers), in
# clock ticks (getconf CLK_TCK a second).
cpu_ticks() {
    local pid total=0 t
    for pid in "$1" $(pgrep -P "$1" || true); do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# utime + stime, in clock ticks, of process $1's threads named $2 (as
# /proc shows a name: its first 15 bytes; tollgate-ledger is the ledger's
# writer, and the PostgreSQL ledger's intake thread too), 0 if it has none.
thread_ticks() {
    local task total=0 t
    for task in /proc/"$1"/task/*; do
        [[ $(cat "$task/comm" 2>/dev/null) == "$2" ]] || continue
        t=$(awk '{ print $14 + $15 }' "$task/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# Prints a loopback TCP port that was free a moment ago (bound, then
# released).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts examples/mock_upstream on 127.0.0.1:0 with the further arguments
# "$@" (--threads, --chunk-delay-us, --max-secs, ...), its stdout in
# $1/mock.out and stderr in $1/mock.err; waits for the bound address it
# prints first. Sets $mock_addr (host:port) and $mock_pid.
# shellcheck disable=SC2034 # $mock_addr is for the caller
start_mock() {
    local dir=$1
    shift
    "$bin/examples/mock_upstream" --listen 127.0.0.1:0 "$@" \
        >"$dir/mock.out" 2>"$dir/mock.err" &
    mock_pid=$!
    pids+=("$mock_pid")
    mock_addr=$(wait_line "$dir/mock.out" '^127\.')
}

# Sets the array $mock_provider_args to the examples/mock_upstream arguments
# that serve provider $1's captured replies (openai, anthropic or gemini;
# tests/fixtures/providers), for start_mock.
# shellcheck disable=SC2034 # $mock_provider_args is for the caller
set_mock_provider_args() {
    local fixtures=$root/tests/fixtures/providers/$1
    case $1 in
    openai) mock_provider_args=(--fixtures "$fixtures") ;;
    anthropic)
        mock_provider_args=(--fixtures "$fixtures"
            --json-file messages.nonstream.cache.json --sse-file messages.stream.cache.sse)
        ;;
    gemini)
        mock_provider_args=(--fixtures "$fixtures"
            --json-file generateContent.json --sse-file streamGenerateContent.sse)
        ;;
    *)
        echo "unknown provider $1 (openai, anthropic or gemini)" >&2
        return 2
        ;;
    esac
}

# Sets the array $flags to the load generator's arguments for scenario $1
# of the per-call counters (callgrind-call.sh, syscalls-call.sh): json
# (none), stream (a streamed call, asking for the usage event; the mock
# sends its events at once) or stream-paced (the same, the mock pausing
# $PACE_US µs, default 1000, before each event, so that each arrives on
# its own, as a model's do).
# shellcheck disable=SC2034 # $flags is for the caller
set_scenario_flags() {
    case $1 in
    json) flags=() ;;
    stream) flags=(--stream --include-usage) ;;
    stream-paced)
        flags=(--stream --include-usage --header "x-mock-chunk-delay-us: ${PACE_US:-1000}")
        ;;
    *)
        echo "unknown SCENARIO $1 (json, stream or stream-paced)" >&2
        return 2
        ;;
    esac
}

# Starts examples/bare_proxy (hyper forwarding alone) to the mock at
# $mock_addr, run by the command "$@" when given (valgrind, say); sets
# $bare_pid and $bare_addr (host:port).
start_bare_proxy() {
    "$@" "$bin/examples/bare_proxy" "$mock_addr" >"$work/bare.out" 2>"$work/bare.err" &
    bare_pid=$!
    pids+=("$bare_pid")
    bare_addr=$(wait_line "$work/bare.out" '^127\.')
}

# Starts nginx (Debian's) in front of the mock at $mock_addr on a free
# loopback port, with $NGINX_WORKERS worker processes (default: nproc): an
# upstream keepalive pool of 64, HTTP/1.1 upstream, proxy_buffering off,
# access log on; its files in $work/nginx. Run by the command "$@" when
# given (valgrind, say), without the NGINX variable of the harnesses (nginx
# would read it as sockets inherited from an upgrade); NGINX_MASTER=off
# serves from the one process. Sets $agent (host:port); its master's pid is
# ${pids[-1]}.
start_nginx() {
    local dir=$work/nginx port attempt i
    mkdir -p "$dir"
    for attempt in 1 2 3; do
        port=$(free_port)
        cat >"$dir/nginx.conf" <<EOF
worker_processes ${NGINX_WORKERS:-$(nproc)};
master_process ${NGINX_MASTER:-on};
user root;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log $dir/access.log;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    upstream mock {
        server $mock_addr;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port;
        location /openai/ {
            proxy_pass http://mock/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
        env -u NGINX "$@" /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>>"$dir/start.err" &
        pids+=($!)
        for i in $(seq 50); do
            if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2)' \
                "$port" 2>/dev/null; then
                agent=127.0.0.1:$port
                return 0
            fi
            kill -0 "${pids[-1]}" 2>/dev/null || break
            sleep 0.1
        done
        kill "${pids[-1]}" 2>/dev/null || true
        echo "nginx did not start on port $port (attempt $attempt):" >&2
        cat "$dir/error.log" "$dir/start.err" >&2 || true
    done
    return 1
}

# Sets $paced_args to the load generator's arguments for the paced streams
# (load.sh's stream-paced, wakeup-delays.sh): the mock pausing $PACE_US µs
# between events, and streams started open loop at $PACED_RATE a second,
# spread over the connections. By default a connection starts a stream
# every 50 pauses (pauses under 1 ms count as 1 ms): a stream has 37, so
# each ends before the next is due; 32 streams/s for $CONNECTIONS=32 and
# 20 ms.
set_paced_args() {
    local rate=${PACED_RATE:-$(python3 -c 'import sys; c, p = map(int, sys.argv[1:]); print(c * 1e6 / (50 * max(p, 1000)))' "$CONNECTIONS" "$PACE_US")}
    paced_args=(--stream --include-usage --header "x-mock-chunk-delay-us: $PACE_US" --rate "$rate")
}

# Starts one busy loop per core at the SCHED_IDLE policy, which any other
# thread preempts, to keep a VM's cores out of their idle state (load.sh's
# KEEP_AWAKE); sets $awake.
awake=()
keep_awake() {
    local i
    for i in $(seq "$(nproc)"); do
        chrt --idle 0 bash -c 'while :; do :; done' &
        awake+=($!)
        pids+=($!)
    done
}
# Stops them.
let_sleep() {
    ((${#awake[@]})) || return 0
    kill "${awake[@]}" 2>/dev/null || true
    wait "${awake[@]}" 2>/dev/null || true
    awake=()
}

# Writes tollgate config $1: both listeners on 127.0.0.1:0, the route
# "openai" (prefix /openai) to the mock at $2 (host:port), the repository's
# pricing and a budget no test reaches; then the rest of the config, TOML
# read from stdin (ledger, state, runs, further routes, ...).
write_tollgate_config() {
    local file=$1 mock=$2
    cat >"$file" <<EOF
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "openai"
prefix = "/openai"
upstream = "http://$mock"
kind = "openai"

[pricing]
files = ["$root/config/pricing.toml"]

[budget]
default_run_usd = 100000.0
max_run_usd = 100000.0

EOF
    cat >>"$file"
}

# Starts tollgate binary $1 with config $2.toml, stdout (the JSON log) in
# $2.log and stderr in $2.err, with RUST_LOG=$3 when $3 is given (else
# RUST_LOG as inherited); waits for its "tollgate listening" log line. Sets
# $tollgate_pid and, from that line, $tollgate_agent and $tollgate_admin
# (host:port).
# shellcheck disable=SC2034 # the addresses are for the caller
start_tollgate_process() {
    local binary=$1 prefix=$2 line addrs
    if [[ -n ${3:-} ]]; then
        RUST_LOG=$3 "$binary" --config "$prefix.toml" >"$prefix.log" 2>"$prefix.err" &
    else
        "$binary" --config "$prefix.toml" >"$prefix.log" 2>"$prefix.err" &
    fi
    tollgate_pid=$!
    pids+=("$tollgate_pid")
    line=$(wait_line "$prefix.log" '"tollgate listening"')
    addrs=$(python3 -c 'import json,sys; l=json.loads(sys.argv[1]); print(l["agent"], l["admin"])' "$line")
    tollgate_agent=${addrs% *}
    tollgate_admin=${addrs#* }
}

# The training load of scripts/pgo.sh and scripts/layout.sh: starts one
# mock per provider shape (each serving that provider's captured replies)
# and tollgate binary $1 (a valgrind wrapper, say) with routes to each, the
# ledger on and a release whose budget window refuses calls; then
# run_training sends OpenAI, Anthropic and Gemini JSON calls and streams,
# OpenAI streams with and without the client's usage option, paced streams,
# calls at a fixed rate and refused calls, TRAIN_SECS (default 3) each, and
# reads /metrics. Sets $tollgate_pid.
start_training() {
    mkdir -p "$work/anthropic" "$work/gemini"
    set_mock_provider_args anthropic
    start_mock "$work/anthropic" --threads 1 "${mock_provider_args[@]}"
    local anthropic_addr=$mock_addr
    set_mock_provider_args gemini
    start_mock "$work/gemini" --threads 1 "${mock_provider_args[@]}"
    local gemini_addr=$mock_addr
    start_mock "$work" --threads 1
    write_tollgate_config "$work/train.toml" "$mock_addr" <<TOML
[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "http://$anthropic_addr"
kind = "anthropic"

[[routes]]
name = "gemini"
prefix = "/gemini"
upstream = "http://$gemini_addr"
kind = "gemini"

[ledger]
enabled = true
path = "$work/train.db"

[[budget.windows]]
release = "capped"
period = "day"
limit_usd = 0.000001
TOML
    start_tollgate_process "$1" "$work/train" info
}

# Sends calls to path $1 for TRAIN_SECS; the other arguments go to loadgen.
train() {
    local path=$1
    shift
    "$bin/examples/loadgen" --url "http://$tollgate_agent$path" \
        --duration-secs "${TRAIN_SECS:-3}" --warmup-secs 0 --label train "$@" |
        python3 -c 'import json, sys; r = json.load(sys.stdin); print("  %s: %d calls, %d not 2xx, %d errors" % (sys.argv[1], r["requests"], r["non_2xx"], r["errors"]), file=sys.stderr)' "$path ${*: -1}"
}

run_training() {
    echo "training..." >&2
    local chat=/openai/v1/chat/completions
    train $chat --connections 32 --header 'x-agent-run-id: t-{conn}-{seq}' --header 'x-agent-release: r1'
    train $chat --connections 16 --stream --include-usage --header 'x-agent-run-id: s-{conn}'
    train $chat --connections 16 --stream --header 'x-agent-run-id: i-{conn}' --header 'x-agent-release: r2'
    train $chat --connections 4 --rate 200 --header 'x-agent-run-id: p-{conn}'
    train $chat --connections 8 --stream --include-usage --header 'x-mock-chunk-delay-us: 2000'
    train $chat --connections 4 --rate 200 --header 'x-agent-release: capped'
    train /anthropic/v1/messages --connections 8 --header 'x-agent-run-id: a-{conn}'
    train /anthropic/v1/messages --connections 8 --stream --header 'x-agent-run-id: as-{conn}'
    local gemini=/gemini/v1beta/models/gemini-2.0-flash
    train "$gemini:generateContent" --connections 8 --header 'x-agent-run-id: g-{conn}'
    train "$gemini:streamGenerateContent?alt=sse" --connections 8 --stream \
        --header 'x-agent-run-id: gs-{conn}'
    curl -fsS "http://$tollgate_admin/metrics" >/dev/null
}
