#!/usr/bin/env bash
# Builds tollgate with profile-guided optimisation (PGO): an instrumented
# dist build serves a training load (examples/mock_upstream and
# examples/loadgen: OpenAI, Anthropic and Gemini JSON calls and streams,
# OpenAI streams with and without the client's usage option, paced streams,
# calls at a fixed rate, refused calls), its profile is merged, and the
# dist build is made again with that profile. The result is
# target/pgo/dist/tollgate; target/dist is left as it is.
#
# Code the training does not run is laid out and optimised as rarely used,
# so the training covers every provider shape tollgate reads.
#
# Needs the toolchain's llvm-tools (`rustup component add llvm-tools`) for
# llvm-profdata. Both builds compile every dependency again with their own
# flags: ~20 minutes on the 2-core machine of BENCHMARKS.md.
#
# Environment (defaults): TRAIN_SECS=3 (per training step)

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TRAIN_SECS=${TRAIN_SECS:-3}

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
[[ -x $profdata ]] || {
    echo "llvm-profdata not found at $profdata (rustup component add llvm-tools)" >&2
    exit 2
}

harness_init pgo
build_dist --example loadgen

profiles="$root/target/pgo/profiles"
rm -rf "$profiles" "$root"/target/pgo/*.profdata
mkdir -p "$profiles"

echo "building the instrumented binary..." >&2
RUSTFLAGS="-Cprofile-generate=$profiles" cargo build --profile dist --locked --quiet \
    --bin tollgate --target-dir "$root/target/pgo/generate"

# One mock per provider shape, each serving that provider's captured replies.
mkdir -p "$work/anthropic" "$work/gemini"
set_mock_provider_args anthropic
start_mock "$work/anthropic" --threads 1 "${mock_provider_args[@]}"
anthropic_addr=$mock_addr
set_mock_provider_args gemini
start_mock "$work/gemini" --threads 1 "${mock_provider_args[@]}"
gemini_addr=$mock_addr
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
LLVM_PROFILE_FILE="$profiles/tollgate-%p-%m.profraw" \
    start_tollgate_process "$root/target/pgo/generate/dist/tollgate" "$work/train" info

# Sends calls to path $1 for TRAIN_SECS; the other arguments go to loadgen.
train() {
    local path=$1
    shift
    "$bin/examples/loadgen" --url "http://$tollgate_agent$path" \
        --duration-secs "$TRAIN_SECS" --warmup-secs 0 --label train "$@" |
        python3 -c 'import json, sys; r = json.load(sys.stdin); print("  %s: %d calls, %d not 2xx, %d errors" % (sys.argv[1], r["requests"], r["non_2xx"], r["errors"]), file=sys.stderr)' "$path ${*: -1}"
}
echo "training..." >&2
chat=/openai/v1/chat/completions
train $chat --connections 32 --header 'x-agent-run-id: t-{conn}-{seq}' --header 'x-agent-release: r1'
train $chat --connections 16 --stream --include-usage --header 'x-agent-run-id: s-{conn}'
train $chat --connections 16 --stream --header 'x-agent-run-id: i-{conn}' --header 'x-agent-release: r2'
train $chat --connections 4 --rate 200 --header 'x-agent-run-id: p-{conn}'
train $chat --connections 8 --stream --include-usage --header 'x-mock-chunk-delay-us: 2000'
train $chat --connections 4 --rate 200 --header 'x-agent-release: capped'
train /anthropic/v1/messages --connections 8 --header 'x-agent-run-id: a-{conn}'
train /anthropic/v1/messages --connections 8 --stream --header 'x-agent-run-id: as-{conn}'
gemini=/gemini/v1beta/models/gemini-2.0-flash
train "$gemini:generateContent" --connections 8 --header 'x-agent-run-id: g-{conn}'
train "$gemini:streamGenerateContent?alt=sse" --connections 8 --stream \
    --header 'x-agent-run-id: gs-{conn}'
curl -fsS "http://$tollgate_admin/metrics" >/dev/null

# A clean exit writes the profile.
kill -TERM "$tollgate_pid"
wait "$tollgate_pid" || true
# Only tollgate's own profile: the build scripts and proc macros built with
# the instrumented flags left theirs in the same directory.
"$profdata" merge -o "$profiles/merged.profdata" "$profiles"/tollgate-*.profraw
# Named by its content: cargo rebuilds when RUSTFLAGS change, not when the
# file they name does.
merged="$root/target/pgo/$(sha256sum "$profiles/merged.profdata" | cut -c1-16).profdata"
mv "$profiles/merged.profdata" "$merged"

echo "building with the profile..." >&2
RUSTFLAGS="-Cprofile-use=$merged" cargo build --profile dist --locked \
    --quiet --bin tollgate --target-dir "$root/target/pgo"
echo "built target/pgo/dist/tollgate" >&2
