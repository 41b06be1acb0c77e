#!/usr/bin/env bash
# Clock reads per message of a benches/callgrind_ack.sh run (issue 21 item 5): the calls into
# std's `Timespec::now` (clock_gettime), by caller, divided by the run's messages.
#
# Usage: benches/clock_reads.sh OUT     (OUT: the prefix callgrind_ack.sh wrote, without suffix)

set -euo pipefail
OUT=$1
MSGS=$(jq '.messages' "$OUT.json")
callgrind_annotate --tree=caller "$OUT.callgrind" 2>/dev/null |
    grep -B4 '\*  .*Timespec>::now \[' | grep ' < ' |
    perl -ne 'if (/:(<std::time::\w+>::\w+) \(([\d,]+)x\)/) { my ($f, $n) = ($1, $2); $n =~ s/,//g; print "$f $n\n" }' |
    awk -v n="$MSGS" '{ t += $2; printf "%-32s %6.2f per message\n", $1, $2 / n }
        END { printf "%-32s %6.2f per message (%d messages)\n", "all clock reads", t / n, n }'
