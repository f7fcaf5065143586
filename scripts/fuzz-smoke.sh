#!/usr/bin/env bash
# Fuzz smoke pass for CI: stable toolchain, no cargo-fuzz, no nightly.
#
# Runs tests/fuzz_smoke.rs, which includes the fuzz targets' bodies
# (fuzz/src/harness.rs) and runs every target over every entry of
# fuzz/corpus/<target>/ and then over FUZZ_SMOKE_CASES inputs derived from
# that corpus (bytes flipped, inserted, cut, entries spliced) or random,
# deterministically (a failure in CI reproduces locally with the same
# command). A failing input is shrunk and saved under fuzz/artifacts/<target>/;
# replay it with the libFuzzer binary or keep it as a regression seed
# (fuzz/corpus/<target>/seed-*).
#
# `cargo test` runs the same test with 1000 cases per target; this script
# runs more: about 20 s on a loaded 2-core machine at the default, plus the
# build of the test binary.
#
# Usage: scripts/fuzz-smoke.sh            (FUZZ_SMOKE_CASES=10000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SMOKE_CASES="${FUZZ_SMOKE_CASES:-10000}"
echo "fuzz smoke: $FUZZ_SMOKE_CASES derived inputs per target"
cargo test --locked --test fuzz_smoke -- --test-threads=2
