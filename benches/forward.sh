#!/usr/bin/env bash
# Store and forward under load (BENCHMARKS.md, "Store and forward").
#
#   benches/forward.sh [SECONDS] [LANES]       (defaults: 60 s, 8 lanes)
#
# Runs, in this order, on loopback:
#   1. the baseline: SENDERS synchronous senders (`bench --conns 50 --pipeline 1`) into a
#      durable `serve` (SQLite) without forwarding;
#   2. the same load into a durable `serve --forward ds=… --forward-lanes LANES`, whose
#      downstream is `serve --no-store`; the backlog (messages stored − messages delivered,
#      from the Prometheus counters) is sampled every 5 s;
#   3. one connection, one message in flight, straight to the downstream: the round-trip
#      limit of a single connection, which bounds one lane.
# Needs target/release/mllp-reactor (cargo build --release -p mllp-reactor-cli).
set -euo pipefail

SECS=${1:-60}
LANES=${2:-8}
SENDERS=50
BIN=${BIN:-target/release/mllp-reactor}
DIR=$(mktemp -d /tmp/mllp-forward-bench.XXXXXX)
cleanup() {
    for f in "$DIR"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

# start NAME ARGS…: starts `serve ARGS…` (pid in $DIR/NAME.pid), waits for its address,
# prints it.
start() {
    local name=$1
    shift
    "$BIN" serve --listen 127.0.0.1:0 --log-level warn "$@" >"$DIR/$name.out" 2>"$DIR/$name.err" &
    echo $! >"$DIR/$name.pid"
    for _ in $(seq 100); do
        if grep -q '^listening on ' "$DIR/$name.out" 2>/dev/null; then
            sed -n 's/^listening on //p' "$DIR/$name.out" | head -1
            return
        fi
        sleep 0.1
    done
    echo "$name did not start" >&2
    cat "$DIR/$name.err" >&2
    exit 1
}

# metric TEXT NAME: the sum of a counter's samples (all labels).
metric() {
    awk -v name="$2" '$1 ~ "^"name"({|$)" { s += $2 } END { printf "%d", s }' <<<"$1"
}

scrape() { curl -s "http://$1/metrics"; }

echo "# baseline: durable serve, no forwarding, $SENDERS senders, ${SECS}s"
BASE=$(start base --store "$DIR/base.db")
"$BIN" bench --to "$BASE" --conns "$SENDERS" --pipeline 1 --duration "${SECS}s" --warmup 2s --json \
    2>/dev/null
kill "$(cat "$DIR/base.pid")"

echo "# downstream: serve --no-store"
DOWN=$(start down --no-store --max-connections 1000)
echo "# durable serve --forward ds=$DOWN --forward-lanes $LANES"
FWD=$(start fwd --store "$DIR/fwd.db" --forward "ds=$DOWN" --forward-lanes "$LANES" \
    --metrics 127.0.0.1:19977)
METRICS=127.0.0.1:19977
"$BIN" bench --to "$FWD" --conns "$SENDERS" --pipeline 1 --duration "${SECS}s" --warmup 2s --json \
    >"$DIR/fwd.json" 2>/dev/null &
BENCH=$!
START=$(date +%s.%N)
echo "t_s stored delivered backlog"
while kill -0 "$BENCH" 2>/dev/null; do
    M=$(scrape "$METRICS")
    S=$(metric "$M" mllp_store_messages_total)
    D=$(metric "$M" mllp_forward_delivered_total)
    printf '%.0f %d %d %d\n' "$(echo "$(date +%s.%N) - $START" | bc)" "$S" "$D" "$((S - D))"
    sleep 5
done
wait "$BENCH"
cat "$DIR/fwd.json"
# Let the tail drain, then the totals.
sleep 3
M=$(scrape "$METRICS")
S=$(metric "$M" mllp_store_messages_total)
D=$(metric "$M" mllp_forward_delivered_total)
echo "# after the run + 3 s: stored $S delivered $D backlog $((S - D))"
echo "# per lane delivered:"
grep '^mllp_forward_delivered_total' <<<"$M" || true
echo "# delivery latency histogram (stored -> downstream AA), cumulative buckets:"
grep '^mllp_forward_delivery_seconds_bucket' <<<"$M" \
    | awk '{ split($1, a, "le=\""); split(a[2], b, "\""); s[b[1]] += $2 } END { for (k in s) print k, s[k] }' \
    | sort -g
echo "# attempts by outcome:"
grep '^mllp_forward_attempts_total' <<<"$M" | awk '$2 > 0' || true

echo "# one connection, one in flight, straight to the downstream (a lane's ceiling), 10s"
"$BIN" bench --to "$DOWN" --conns 1 --pipeline 1 --duration 10s --warmup 1s --json 2>/dev/null
