#!/usr/bin/env bash
# Writes link/hot-functions.txt, the functions tollgate runs, hottest first,
# which link/linker.sh places first and together when it links an optimised
# tollgate binary: the `dist` build serves the training load of
# scripts/pgo.sh (run_training in scripts/lib.sh) under callgrind, which
# lists every function of the binary that ran; the list keeps each one's
# name as `nm -C` prints it, without its hash, and its size. Then the
# `dist` build is linked again with the new list.
#
# Why: the kernel maps a binary's code in blocks of up to 64 KiB around each
# page that runs (fault-around). The ~1,900 functions a proxy runs, spread
# over 9 MB of code, kept ~7 MiB of it resident (BENCHMARKS.md, "Memory").
# Run it again when the code has changed much: functions that are new or
# renamed since the list was written are not placed.
#
# Needs valgrind. Result: link/hot-functions.txt and target/dist/tollgate;
# with UNORDERED=1 also target/layout/tollgate-unordered, the same build
# linked with no list, for A/B runs (one more build). Prints over how many
# 64 KiB blocks the functions that ran lie, before and after.
#
# With ALSO=<another tollgate binary> (the profile-guided build,
# target/pgo/dist/tollgate) that binary serves the training too, and the
# functions it ran that the list lacks go after the list's: its compiler
# inlines differently, and what it runs out of line would otherwise lie
# among the cold code. Build it again afterwards to lay it out.
#
# Environment (defaults): UNORDERED=0, TRAIN_SECS=3 (per training step), ALSO=

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v valgrind >/dev/null || {
    echo "scripts/layout.sh needs valgrind (apt-get install valgrind)" >&2
    exit 2
}

harness_init layout
list=$root/link/hot-functions.txt
binary=$root/target/dist/tollgate
# tollgate alone, as build_dist builds it; cargo links it again when the
# list changes (build.rs).
build() {
    cargo build --profile dist --locked --quiet --bin tollgate
}

build_dist --example loadgen # the mock and the load generator
if [[ ${UNORDERED:-0} == 1 ]]; then
    echo "building with no list..." >&2
    : >"$work/empty"
    TOLLGATE_HOT_FUNCTIONS=$work/empty build
    mkdir -p "$root/target/layout"
    cp "$binary" "$root/target/layout/tollgate-unordered"
fi
echo "building with the current list..." >&2
build
cp "$binary" "$work/tollgate-before"

# Runs binary $1 under callgrind with the training load, in the work
# directory $2 (created): writes $2/ran.txt, the binary's functions that
# ran, hottest first, and $2/hot-functions.txt, the same as the list keeps
# them.
functions_that_ran() {
    local saved_work=$work
    work=$2
    mkdir -p "$work"
    cat >"$work/valgrind" <<VEOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file=$work/callgrind.out "$1" "\$@"
VEOF
    chmod +x "$work/valgrind"
    WAIT_SECS=120 start_training "$work/valgrind"
    run_training
    # callgrind writes its file when the process exits.
    kill -TERM "$tollgate_pid"
    wait "$tollgate_pid" || true

    # The binary's functions that ran, by their own instructions, hottest first.
    python3 - "$work/callgrind.out" "$1" >"$work/ran.txt" <<'PYEOF'
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

    # Each function that ran as the list keeps it: its size, as nm prints it,
    # and its name as `nm -C` prints it, without the hash.
    python3 - "$1" "$work/ran.txt" >"$work/hot-functions.txt" <<'PYEOF'
import re, subprocess, sys

binary, ran = sys.argv[1], sys.argv[2]


def nm(*flags):
    out = subprocess.run(["nm", "-p", "-S", "--defined-only", *flags, binary],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


entry = {}
for mangled, demangled in zip(nm(), nm("-C")):
    f = mangled.split(" ")
    if len(f) == 4:
        name = demangled.split(" ", 3)[3]
        name = re.sub(r"\.llvm\.[0-9]+$", "", name)
        name = re.sub(r"::h[0-9a-f]{16}$", "", name)
        entry[f[3]] = f"{f[1]}\t{name}"
for line in open(ran):
    if line.strip() in entry:
        print(entry[line.strip()])
PYEOF

    work=$saved_work
}

functions_that_ran "$work/tollgate-before" "$work/dist"
cp "$work/dist/hot-functions.txt" "$work/hot-functions.txt"
if [[ -n ${ALSO:-} ]]; then
    # What the other build ran that the list does not hold goes after it:
    # names it alone ran, and sizes of its own for names both ran (its
    # copy of a function differs in size; link/linker.sh places the copies
    # of every listed size, at the name's first place).
    cp "$ALSO" "$work/tollgate-also"
    functions_that_ran "$work/tollgate-also" "$work/also"
    awk '!seen[$0]++' "$work/hot-functions.txt" "$work/also/hot-functions.txt" >"$work/merged.txt"
    echo "$(($(wc -l <"$work/merged.txt") - $(wc -l <"$work/hot-functions.txt"))) entries that only $ALSO ran added" >&2
    mv "$work/merged.txt" "$work/hot-functions.txt"
fi

[[ -s $work/hot-functions.txt ]] || {
    echo "no function of the binary ran under callgrind: link/hot-functions.txt is left as it was" >&2
    exit 1
}
echo "before, the functions that ran:" >&2
scripts/check-layout.sh "$work/tollgate-before" "$work/dist/ran.txt" 2>/dev/null || true
cp "$work/hot-functions.txt" "$list"
echo "linking with the new list ($(wc -l <"$list") functions)..." >&2
build
echo "after, the symbols the list names:" >&2
scripts/check-layout.sh
echo "wrote link/hot-functions.txt; built target/dist/tollgate" >&2
