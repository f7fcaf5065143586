#!/usr/bin/env bash
# Builds tollgate with profile-guided optimisation (PGO): an instrumented
# dist build serves a training load (examples/mock_upstream and
# examples/loadgen: OpenAI, Anthropic and Gemini JSON calls and streams,
# OpenAI streams with and without the client's usage option, paced streams,
# calls at a fixed rate, refused calls; run_training in scripts/lib.sh),
# its profile is merged, and the dist build is made again with that
# profile. The result is target/pgo/dist/tollgate; target/dist is left as
# it is.
#
# Code the training does not run is laid out and optimised as rarely used,
# so the training covers every provider shape tollgate reads.
#
# Needs the toolchain's llvm-tools (`rustup component add llvm-tools`) for
# llvm-profdata. Both builds compile every dependency again with their own
# flags: ~12 minutes on the 2-core machine of BENCHMARKS.md.
#
# The Docker image is built with it (Dockerfile).
#
# Environment (defaults): TRAIN_SECS=3 (per training step) PREBUILT=0

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
[[ -x $profdata ]] || {
    echo "llvm-profdata not found at $profdata (rustup component add llvm-tools)" >&2
    exit 2
}

harness_init pgo
# The training's mock upstream and load generator; the plain tollgate binary
# is not needed (PREBUILT=1 uses the examples target/dist already holds).
echo "building the training's tools (dist profile)..." >&2
build_dist_tools --example loadgen

profiles="$root/target/pgo/profiles"
rm -rf "$profiles" "$root"/target/pgo/*.profdata
mkdir -p "$profiles"

echo "building the instrumented binary..." >&2
RUSTFLAGS="-Cprofile-generate=$profiles" cargo build --profile dist --locked --quiet \
    --bin tollgate --target-dir "$root/target/pgo/generate"

LLVM_PROFILE_FILE="$profiles/tollgate-%p-%m.profraw" \
    start_training "$root/target/pgo/generate/dist/tollgate"
run_training

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
