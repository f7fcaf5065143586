#!/bin/sh
# The linker rustc runs on x86_64 Linux (.cargo/config.toml): `cc`, as
# rustc would run it. An optimised build of the tollgate binary (profiles
# release and dist) is then linked a second time with the functions named
# in link/hot-functions.txt placed first and next to each other.
#
# Why: the kernel maps a binary's code in blocks of up to 64 KiB around each
# page that runs (fault-around). The ~1,900 functions a proxy runs, spread
# over 9 MB of code, kept ~7 MiB of it resident; together they keep ~3
# (BENCHMARKS.md, "Memory").
#
# The list names functions as `nm -C` prints them, without the hash that
# legacy symbol names end with, and with the size of the copy that ran (a
# generic function has one copy per type, under one name): a name keeps
# matching while the code around it changes. scripts/layout.sh writes it
# from what a training load runs. The second link gets the exact symbols
# of the first (lld's --symbol-ordering-file; the linker rustc uses here,
# and mold, read it). Whatever fails in that step leaves the first link's
# binary as it is.
#
# TOLLGATE_HOT_FUNCTIONS=<file> names another list (build.rs makes cargo
# link again when it changes); an empty file gives the plain link.
set -u

out=
prev=
for arg in "$@"; do
    [ "$prev" = -o ] && out=$arg
    prev=$arg
done
case $out in
*/release/deps/tollgate-* | */dist/deps/tollgate-*) ;;
*) exec cc "$@" ;;
esac

cc "$@" || exit
list=${TOLLGATE_HOT_FUNCTIONS:-$(dirname "$0")/hot-functions.txt}
order=$out.order
rm -f "$order"
[ -s "$list" ] || exit 0

# nm in symbol-table order twice, mangled and demangled, line by line.
nm -p -S --defined-only "$out" >"$order.mangled" &&
    nm -p -S -C --defined-only "$out" >"$order.demangled" &&
    paste "$order.mangled" "$order.demangled" | awk -F '\t' '
        # The list: size (hex, as nm prints it) and name, hottest first.
        FNR == NR { n++; name[n] = $2; sizes[$2] = sizes[$2] " " $1; next }
        {
            split($1, m, " ")
            if (m[3] !~ /^[tTwW]$/ || m[4] == "") next
            d = $2
            sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", d)
            sub(/\.llvm\.[0-9]+$/, "", d)
            if (match(d, /::h[0-9a-f]+$/) && RLENGTH == 19) d = substr(d, 1, RSTART - 1)
            if (!(d in sizes)) next
            any[d] = any[d] m[4] "\n"
            if (index(sizes[d] " ", " " m[2] " ")) same[d] = same[d] m[4] "\n"
        }
        # Each name once, at its hottest place: the copies of the size that
        # ran, or every copy when none has that size any more.
        END {
            for (i = 1; i <= n; i++) {
                d = name[i]
                if (d in done) continue
                done[d] = 1
                printf "%s", (d in same) ? same[d] : any[d]
            }
        }' "$list" - >"$order"
status=$?
rm -f "$order.mangled" "$order.demangled"
if [ $status -ne 0 ] || [ ! -s "$order" ]; then
    echo "link/linker.sh: no code layout for $out (nm failed, or no listed function found)" >&2
    exit 0
fi

mv "$out" "$out.unordered" || exit 0
if cc "$@" "-Wl,--symbol-ordering-file=$order" -Wl,--no-warn-symbol-ordering; then
    rm -f "$out.unordered"
else
    echo "link/linker.sh: the linker cannot order symbols; $out is not laid out" >&2
    mv "$out.unordered" "$out"
fi
exit 0
