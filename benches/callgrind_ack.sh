#!/usr/bin/env bash
# Instructions (or syscalls) per message of the ACK-only server (issue 21): `serve --no-store`
# (or the command in SERVER_CMD) under callgrind, driven by one connection, one message in
# flight (S1), for DURATION; start-up and shutdown included. Prints the total, the messages,
# the quotient, and the top functions (inclusive and self) per message.
#
# Usage: benches/callgrind_ack.sh [DURATION]     (default 20s: about 21 000 round trips here)
# Needs valgrind (strace with TOOL=strace) and the release build
# (cargo build --release -p mllp-reactor-cli --examples).
#
# Environment:
#   SERVER_CMD=...   the server (default `serve --no-store`; the limit:
#                    SERVER_CMD="target/release/examples/baseline_server 127.0.0.1:0")
#   BENCH_ARGS=...   the load (default S1: --conns 1 --pipeline 1 --size 1024; S4:
#                    BENCH_ARGS="--conns 4 --pipeline 1 --size 1048576")
#   TOOL=callgrind   or strace: the server under `strace -f -c` instead, and the calls per
#                    message of each syscall (strace slows every syscall down: compare counts,
#                    not times, and servers measured the same way)
#   STRACE_ARGS=...  extra strace flags, e.g. "--seccomp-bpf -e trace=epoll_wait,writev,sendto"
#                    to count only those, at nearly full speed
#   CALLGRIND_ARGS=... extra callgrind flags, e.g. "--cache-sim=yes" (D1 and last-level cache
#                    misses, simulated for user-space accesses only: the kernel's copy of a
#                    `recv` into the buffer is not seen) or "--cache-sim=yes --LL=1048576,16,64"
#                    to simulate one core's 1 MiB share of the L2 as the last level; every
#                    event's total per message is printed then

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-20s}
SERVER_CMD=${SERVER_CMD:-target/release/mllp-reactor serve --no-store --listen 127.0.0.1:0}
BENCH_ARGS=${BENCH_ARGS:---conns 1 --pipeline 1 --size 1024}
TOOL=${TOOL:-callgrind}
OUT=${OUT:-target/$TOOL/ack-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$(dirname "$OUT")"

case $TOOL in
    # shellcheck disable=SC2086 # SERVER_CMD and CALLGRIND_ARGS are lists of words on purpose
    callgrind) valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$OUT.callgrind" $SERVER_CMD \
        >"$OUT.stdout" 2>"$OUT.stderr" & ;;
    # shellcheck disable=SC2086 # SERVER_CMD and STRACE_ARGS are lists of words on purpose
    strace) strace -f -c ${STRACE_ARGS:-} -o "$OUT.strace" $SERVER_CMD \
        >"$OUT.stdout" 2>"$OUT.stderr" & ;;
    *) echo "callgrind_ack: TOOL must be callgrind or strace, got '$TOOL'" >&2; exit 1 ;;
esac
SERVER=$!
trap 'kill -KILL $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [[ -s $OUT.stdout ]] && break
    sleep 0.1
done
ADDR=$(head -n 1 "$OUT.stdout")
ADDR=${ADDR#listening on }
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
target/release/mllp-reactor bench --to "$ADDR" $BENCH_ARGS \
    --duration "$DURATION" --warmup 0s --json >"$OUT.json"
# Under strace the server is strace's child; strace writes its table once the server exits.
if [[ $TOOL == strace ]]; then pkill -TERM -P "$SERVER"; else kill -TERM "$SERVER"; fi
wait "$SERVER" || true
trap - EXIT

# Every message (no warmup: start-up is included, as in the issue's method).
MSGS=$(jq '.messages' "$OUT.json")
if [[ $TOOL == strace ]]; then
    echo "messages: $MSGS ($SERVER_CMD; $BENCH_ARGS)"
    echo "calls per message, syscall:"
    awk -v n="$MSGS" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
        errors = NF == 6 ? $5 : 0
        printf "%10.3f %s%s\n", $4 / n, $NF, errors ? sprintf(" (%d errors)", errors) : "" }' \
        "$OUT.strace" | sort -rn | head -n 20
    echo "raw: $OUT.strace"
    exit 0
fi
callgrind_annotate "$OUT.callgrind" >"$OUT.self.txt" 2>/dev/null
callgrind_annotate --inclusive=yes "$OUT.callgrind" >"$OUT.inclusive.txt" 2>/dev/null
TOTAL=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$OUT.self.txt")
echo "instructions: $TOTAL, messages: $MSGS, per message: $((TOTAL / MSGS))"
per_message() {
    awk -v n="$MSGS" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
        v = $1; gsub(",", "", v); $1 = ""; $2 = ""; printf "%8d %s\n", v / n, $0 }' "$1" | head -n 40
}
if [[ -n ${CALLGRIND_ARGS:-} ]]; then
    # Every event callgrind counted (Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw with the cache
    # simulation), per message, in total and for the functions with the most last-level read
    # misses (self).
    EVENTS=$(awk '/^Events shown:/ { $1 = ""; $2 = ""; print; exit }' "$OUT.self.txt")
    # shellcheck disable=SC2086 # EVENTS is a list of words on purpose
    printf '%10s' $EVENTS; echo "  (per message)"
    awk -v n="$MSGS" '/Auto-annotated source/ { exit } /^ *[0-9,]+ \(/ {
            line = $0; k = 0
            while (match(line, /^ *[0-9,.]+ (\([ 0-9.]+%\))?/)) {
                v = substr(line, RSTART, RLENGTH); sub(/\(.*/, "", v); gsub(/[ ,]/, "", v)
                val[++k] = v; line = substr(line, RSTART + RLENGTH)
            }
            for (i = 1; i <= k; i++) printf "%10.0f", val[i] / n
            print "  " line }' "$OUT.self.txt" | head -n 12
fi
echo "--- inclusive, per message"
per_message "$OUT.inclusive.txt"
echo "--- self, per message"
per_message "$OUT.self.txt"
echo "raw: $OUT.callgrind"
