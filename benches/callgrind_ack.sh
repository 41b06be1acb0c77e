#!/usr/bin/env bash
# Instructions per message of the ACK-only server (issue 21): `serve --no-store` (or the
# command in SERVER_CMD) under callgrind, driven by one connection, one message in flight
# (S1), for DURATION; start-up and shutdown included. Prints the total, the messages, the
# quotient, and the top functions (inclusive and self) per message.
#
# Usage: benches/callgrind_ack.sh [DURATION]     (default 20s: about 21 000 round trips here)
# Needs valgrind and the release build (cargo build --release -p mllp-reactor-cli --examples).

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-20s}
SERVER_CMD=${SERVER_CMD:-target/release/mllp-reactor serve --no-store --listen 127.0.0.1:0}
OUT=${OUT:-target/callgrind/ack-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$(dirname "$OUT")"

# shellcheck disable=SC2086 # SERVER_CMD is a list of words on purpose
valgrind --tool=callgrind --callgrind-out-file="$OUT.callgrind" $SERVER_CMD \
    >"$OUT.stdout" 2>"$OUT.stderr" &
SERVER=$!
trap 'kill -KILL $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [[ -s $OUT.stdout ]] && break
    sleep 0.1
done
ADDR=$(head -n 1 "$OUT.stdout")
ADDR=${ADDR#listening on }
target/release/mllp-reactor bench --to "$ADDR" --conns 1 --pipeline 1 --size 1024 \
    --duration "$DURATION" --warmup 0s --json >"$OUT.json"
kill -TERM "$SERVER"
wait "$SERVER" || true
trap - EXIT

# Every message (no warmup: start-up is included, as in the issue's method).
MSGS=$(jq '.messages' "$OUT.json")
callgrind_annotate "$OUT.callgrind" >"$OUT.self.txt" 2>/dev/null
callgrind_annotate --inclusive=yes "$OUT.callgrind" >"$OUT.inclusive.txt" 2>/dev/null
TOTAL=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$OUT.self.txt")
echo "instructions: $TOTAL, messages: $MSGS, per message: $((TOTAL / MSGS))"
per_message() {
    awk -v n="$MSGS" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
        v = $1; gsub(",", "", v); $1 = ""; $2 = ""; printf "%8d %s\n", v / n, $0 }' "$1" | head -n 40
}
echo "--- inclusive, per message"
per_message "$OUT.inclusive.txt"
echo "--- self, per message"
per_message "$OUT.self.txt"
echo "raw: $OUT.callgrind"
