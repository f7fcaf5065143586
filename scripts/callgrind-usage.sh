#!/usr/bin/env bash
# Instructions per byte of the usage tap (decoder + extractor) on each
# captured provider stream, counted by valgrind's callgrind: unlike
# wall-clock benchmarks the figure repeats on a busy machine, so a change
# that makes the parser slower shows up as a higher count.
#
# Builds the `usage` bench (bench profile), then for every case runs its
# fixed mode (USAGE_BENCH_ONLY=<case> USAGE_BENCH_ITERS=<n>: the stream
# inflated to ~1 MiB, fed in 16 KiB reads, n times, no criterion) under
# callgrind twice, with ITERS and with 0 iterations, and prints
#   (instructions(ITERS) - instructions(0)) / (ITERS x bytes)
# so start-up and fixture loading cancel out.
#
# Environment (defaults): ITERS=3 CASES="<every case>"
#   OUT=<temp dir>/callgrind-usage.tsv (one line per case, tab-separated)

set -euo pipefail

ITERS=${ITERS:-3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
command -v valgrind >/dev/null || {
    echo "valgrind is not installed (apt-get install -y valgrind)" >&2
    exit 2
}

work=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-callgrind.XXXXXX")
trap 'rm -rf "$work"' EXIT
OUT=${OUT:-$work/callgrind-usage.tsv}

echo "building the usage bench..." >&2
bench=$(cargo bench --bench usage --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "usage" and m.get("executable"):
        print(m["executable"])')
[[ -x $bench ]] || {
    echo "could not find the usage bench binary" >&2
    exit 1
}

all_cases=$(grep -oE 'name: "[^"]+"' benches/usage.rs | cut -d'"' -f2)
CASES=${CASES:-$all_cases}

# Prints "<instructions> <bytes>" for one case and iteration count.
count() {
    local case=$1 iters=$2 file=$work/cg.out
    local printed
    printed=$(USAGE_BENCH_ONLY=$case USAGE_BENCH_ITERS=$iters \
        timeout 600 valgrind --tool=callgrind --callgrind-out-file="$file" \
        "$bench" 2>/dev/null)
    local bytes=${printed%% bytes*}
    local instructions
    instructions=$(awk '/^summary:/ { print $2 }' "$file")
    echo "$instructions $bytes"
}

: >"$OUT"
printf '%-28s %12s %10s\n' case bytes instr/byte
for case in $CASES; do
    read -r with bytes < <(count "$case" "$ITERS")
    read -r without _ < <(count "$case" 0)
    per_byte=$(python3 -c 'import sys; w, wo, n, b = map(int, sys.argv[1:]); print(f"{(w - wo) / (n * b):.2f}")' \
        "$with" "$without" "$ITERS" "$bytes")
    printf '%-28s %12s %10s\n' "$case" "$bytes" "$per_byte"
    printf '%s\t%s\t%s\n' "$case" "$bytes" "$per_byte" >>"$OUT"
done
echo "valgrind $(valgrind --version), ITERS=$ITERS; results: $OUT" >&2
