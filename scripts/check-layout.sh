#!/usr/bin/env bash
# Checks that link/linker.sh laid out an optimised tollgate binary: every
# symbol it chose for link/hot-functions.txt is there, and they lie
# together, over at most two 64 KiB blocks more than their size needs
# (not laid out, the same functions spread over ~3 times that).
#
# Usage: scripts/check-layout.sh [binary [symbols]]: the symbols are those
# in the wrapper's file beside the binary (binary.order) unless a file of
# symbol names is given. With no binary, the newest
# target/{dist,release}/deps/tollgate-* that the wrapper laid out (CI runs
# it after `cargo bench --no-run`).

set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-}
if [[ -z $binary ]]; then
    order=$(ls -t target/dist/deps/tollgate-*.order target/release/deps/tollgate-*.order 2>/dev/null | head -1 || true)
    [[ -n $order ]] || {
        echo "check-layout: no target/{dist,release}/deps/tollgate-*.order: link/linker.sh did not lay out a binary" >&2
        exit 1
    }
    binary=${order%.order}
fi
symbols=${2:-$binary.order}
[[ -s $symbols ]] || {
    echo "check-layout: $symbols is missing or empty" >&2
    exit 1
}
nm -S --defined-only "$binary" | python3 -c '
import sys
listed = set(open(sys.argv[1]).read().split())
found, size, blocks = set(), 0, set()
for line in sys.stdin:
    f = line.split()
    if len(f) == 4 and f[3] in listed and f[2] in "tTwW":
        start, length = int(f[0], 16), int(f[1], 16)
        found.add(f[3])
        size += length
        blocks.update(range(start >> 16, ((start + max(length, 1) - 1) >> 16) + 1))
need = -(-size // 65536)
print(f"check-layout: {sys.argv[2]}: {len(found)} of {len(listed)} symbols, "
      f"{size / 2**20:.1f} MiB, over {len(blocks)} blocks of 64 KiB (their size needs {need})")
if len(found) < len(listed) or len(blocks) > need + 2:
    sys.exit("check-layout: the symbols are not laid out together")
' "$symbols" "$binary"
