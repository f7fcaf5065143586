#!/usr/bin/env bash
# Lays out tollgate's code so that the functions it runs sit next to each
# other: a build serves the training load of scripts/pgo.sh (run_training in
# scripts/lib.sh) under callgrind, which lists every function of the binary
# that ran, hottest first; then the same build is linked with that list as
# the linker's --symbol-ordering-file (build.rs, TOLLGATE_SYMBOL_ORDER).
#
# Why: the kernel maps a binary's code in blocks of up to 64 KiB around each
# page that runs (fault-around). The ~1,900 functions a proxy runs, spread
# over 9 MB of code, kept ~7 MB of it resident (BENCHMARKS.md, "Memory").
#
# Symbol names carry hashes that differ from build to build, so the list is
# made from, and applied to, one build: both builds run with the same
# TOLLGATE_SYMBOL_ORDER path (cargo treats the variable's value as part of
# the build; the file's content only makes build.rs run again, and the
# compiler's output is the same), the first with an empty file.
#
# Needs valgrind, and a linker with --symbol-ordering-file: lld (rustc's
# default on x86_64 Linux) or mold. Result: target/layout/tollgate (with
# PGO=1 target/pgo/layout/tollgate), and the same build without the order
# as tollgate-unordered beside it; prints
# how many of the listed functions the new binary has and over how many
# 64 KiB blocks they lie, before and after.
#
# Environment (defaults): PGO=0 (1: lays out scripts/pgo.sh's build, built
#   again with its profile, in target/pgo), TRAIN_SECS=3 (per training step)

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v valgrind >/dev/null || {
    echo "scripts/layout.sh needs valgrind (apt-get install valgrind)" >&2
    exit 2
}

harness_init layout
target_dir=$root/target
if [[ ${PGO:-0} == 1 ]]; then
    target_dir=$root/target/pgo
    profdata=("$target_dir"/*.profdata)
    [[ -e ${profdata[0]} ]] || {
        echo "no profile in target/pgo: run scripts/pgo.sh first" >&2
        exit 2
    }
fi
out=$target_dir/layout
mkdir -p "$out"
order=$out/symbol-order.txt
: >"$order"
if [[ ${PGO:-0} == 1 ]]; then
    build_dist --example loadgen # the mock and load generator
    # The flags of scripts/pgo.sh's last build, so that only tollgate is
    # built again.
    export RUSTFLAGS="-Cprofile-use=${profdata[0]}"
    export TOLLGATE_SYMBOL_ORDER=$order
else
    export TOLLGATE_SYMBOL_ORDER=$order
    build_dist --example loadgen # also the first build below
fi
binary=$target_dir/dist/tollgate
build() {
    cargo build --profile dist --locked --quiet --bin tollgate --target-dir "$target_dir"
}

echo "building (no order yet)..." >&2
build
cp "$binary" "$out/tollgate-unordered"

cat >"$work/valgrind" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file=$work/callgrind.out "$binary" "\$@"
EOF
chmod +x "$work/valgrind"
WAIT_SECS=120 start_training "$work/valgrind"
run_training
# callgrind writes its file when the process exits.
kill -TERM "$tollgate_pid"
wait "$tollgate_pid" || true

# The binary's functions that ran, by their own instructions, hottest first.
python3 - "$work/callgrind.out" "$binary" >"$order" <<'PYEOF'
import re, sys

path, binary = sys.argv[1], sys.argv[2]
names = {"ob": {}, "fn": {}}


def name(kind, rest):
    # Compressed names: "(id) name" the first time, "(id)" after.
    m = re.match(r"\((\d+)\)(?: (.*))?", rest)
    if m.group(2) is not None:
        names[kind][m.group(1)] = m.group(2)
    return names[kind][m.group(1)]


own = {}
ob = fn = None
call_cost_next = False
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("ob="):
        ob = name("ob", line[3:])
    elif line.startswith("fn="):
        fn = name("fn", line[3:])
        if ob == binary:
            own.setdefault(fn, 0)
    elif line.startswith("cob="):
        name("ob", line[4:])
    elif line.startswith("cfn="):
        name("fn", line[4:])
    elif line.startswith("calls="):
        call_cost_next = True  # the next cost line is the callee's, inclusive
    elif line[:1].isdigit() or line[:1] in "+-*":
        if call_cost_next:
            call_cost_next = False
        elif fn in own:
            fields = line.split()
            if len(fields) > 1:
                own[fn] += int(fields[1])
total = {}
for fn, cost in own.items():
    fn = re.sub(r"'\d+$", "", fn)  # callgrind's recursion depth
    if not fn.startswith(("0x", "(")):  # addresses without a symbol
        total[fn] = total.get(fn, 0) + cost
for fn, _ in sorted(total.items(), key=lambda kv: -kv[1]):
    print(fn)
PYEOF

echo "linking with the order ($(wc -l <"$order") functions)..." >&2
build
cp "$binary" "$out/tollgate"

# Of the listed functions: how many each binary has, their bytes, and the
# 64 KiB blocks of the binary they touch.
spread() {
    nm -S --defined-only "$1" | python3 -c '
import sys
listed = set(open(sys.argv[1]).read().split())
found, size, blocks = set(), 0, set()
for line in sys.stdin:
    f = line.split()
    if len(f) == 4 and f[3] in listed and f[2] in "tT":
        start, length = int(f[0], 16), int(f[1], 16)
        found.add(f[3])
        size += length
        blocks.update(range(start >> 16, ((start + max(length, 1) - 1) >> 16) + 1))
print(f"{len(found)} of {len(listed)} functions, {size / 2**20:.1f} MiB, over {len(blocks)} blocks of 64 KiB ({len(blocks) / 16:.1f} MiB)")
' "$order"
}
echo "before: $(spread "$out/tollgate-unordered")"
echo "after:  $(spread "$out/tollgate")"
echo "built ${out#"$root"/}/tollgate" >&2
