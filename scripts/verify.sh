#!/usr/bin/env bash
# Model-check the send-side sync handshake with SPIN (docs/sync-protocol.md).
#
# Our design (verify/multifd_new.pml, stepped through the table generated from
# handshake.SEND_TABLE) must pass for 1, 2 and 3 channels: the safety run (assertions I1,
# I2, I3, the waiter check, the engine's "no idle channel" assertion, and no invalid end
# state, i.e. no deadlock) and the LTL property "every sync request is eventually
# answered" under weak fairness. The QEMU < 9.0 design (verify/multifd_old.pml) must
# fail: SPIN has to find its race. Prints a table of state counts and the old race's
# shortest trail; exits non-zero on any unexpected result.
#
# Usage: scripts/verify.sh        (needs spin and a C compiler: CC, default gcc)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cc=${CC:-gcc}
if ! command -v spin >/dev/null 2>&1; then
    echo "verify: spin is not installed (Debian: apt-get install spin)" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$root"/verify/*.pml "$work"
cd "$work"

# pan MODEL NCH CFLAGS PANFLAGS...: generate, compile and run one verifier; sets
# $errors and $states from its report. A search cut short without an error found (too
# deep, out of memory) is a failure: it proves nothing.
pan() {
    local model=$1 nch=$2 cflags=$3
    shift 3
    spin -a -DNCH="$nch" "$model" >spin.log 2>&1 || { cat spin.log >&2; return 1; }
    # shellcheck disable=SC2086  # cflags is a list of options
    "$cc" -O1 -w $cflags -o pan pan.c
    ./pan -m200000 -w20 "$@" >pan.log 2>&1 || true
    errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' pan.log)
    states=$(sed -n 's/^ *\([0-9][0-9.e+]*\) states, stored.*/\1/p' pan.log)
    if [ -z "$errors" ] || { [ "$errors" = 0 ] && grep -q "Search not completed\|max search depth too small\|out of memory" pan.log; }; then
        cat pan.log >&2
        errors=incomplete
    fi
}

# violated MODEL NCH: replay the trail pan wrote; print the comment on the first
# assertion that failed (in props.pml each one says which property it checks).
violated() {
    local where
    where=$(spin -t -DNCH="$2" "$1" 2>&1 | sed -n 's/^spin: \([a-z_]*\.pml\):\([0-9]*\), Error: assertion violated.*/\1 \2/p' | head -1)
    # shellcheck disable=SC2086  # two words: file and line
    set -- $where
    [ $# = 2 ] && sed -n "$2s|.*/\* *\(.*\) \*/.*|\1|p" "$1"
}

failed=0
printf '%-16s %3s  %-28s %9s %7s  %s\n' model NCH check states errors result
check() {  # check MODEL NCH LABEL EXPECT CFLAGS PANFLAGS...
    local model=$1 nch=$2 label=$3 expect=$4 cflags=$5
    shift 5
    pan "$model" "$nch" "$cflags" "$@"
    local verdict=ok
    if [ "$errors" = incomplete ]; then
        verdict="FAILED (search incomplete)"
        failed=1
    elif [ "$expect" = none ] && [ "$errors" != 0 ]; then
        verdict="FAILED: $(violated "$model" "$nch" || sed -n 's/^pan:1: \(.*\) (at depth.*/\1/p' pan.log)"
        failed=1
    elif [ "$expect" = some ] && [ "$errors" = 0 ]; then
        verdict="FAILED (expected SPIN to find the race)"
        failed=1
    elif [ "$expect" = some ]; then
        verdict="ok, violates $(violated "$model" "$nch")"
    fi
    printf '%-16s %3s  %-28s %9s %7s  %s\n' "$model" "$nch" "$label" "$states" "$errors" "$verdict"
}

for nch in 1 2 3; do
    check multifd_new.pml "$nch" "safety" none "-DSAFETY -DNOCLAIM"
    check multifd_new.pml "$nch" "ltl answered, weak fairness" none "" -a -f
done
for nch in 1 2 3; do
    check multifd_old.pml "$nch" "safety" some "-DSAFETY -DNOCLAIM"
done

# The old race, shortest (pan -i needs -DREACH to be exact), replayed step by step.
pan multifd_old.pml 1 "-DSAFETY -DNOCLAIM -DREACH" -i
echo
echo "QEMU < 9.0, 1 channel, the shortest trail to the race:"
spin -t -DNCH=1 multifd_old.pml 2>&1 | sed -n 's/^ *MSC: /  /p'
echo "  violated: $(violated multifd_old.pml 1)"

if [ "$failed" != 0 ]; then
    echo "verify: unexpected result" >&2
fi
exit "$failed"
