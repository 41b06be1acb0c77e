#!/usr/bin/env bash
# The store's WAL under sustained load: `serve --store` driven at S3 (50 connections,
# pipeline 8, 1 KiB) for DURATION, with the WAL file's size sampled every INTERVAL seconds.
#
# Usage: benches/wal_size.sh [DURATION] [INTERVAL]     (defaults 5m and 5)
#
# Prints one line per sample, "<seconds> <WAL bytes> <database bytes>", then the bench report,
# then the largest WAL seen. Run it under `nice -n 19` on a shared machine. Needs the release
# binary (cargo build --release -p mllp-reactor-cli).

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-5m}
INTERVAL=${2:-5}
BIN=target/release/mllp-reactor
DIR=$(mktemp -d "${TMPDIR:-/tmp}/mllp-wal-size.XXXXXX")
STORE=$DIR/store.db
SERVER_PID=
cleanup() {
    [[ -n $SERVER_PID ]] && kill -KILL "$SERVER_PID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"$BIN" serve --store "$STORE" --listen 127.0.0.1:0 >"$DIR/serve.out" 2>"$DIR/serve.err" &
SERVER_PID=$!
for _ in $(seq 300); do
    [[ -s $DIR/serve.out ]] && break
    sleep 0.1
done
ADDR=$(head -n 1 "$DIR/serve.out")
ADDR=${ADDR#listening on }
[[ -n $ADDR ]] || { echo "serve did not start" >&2; exit 1; }

"$BIN" bench --to "$ADDR" --conns 50 --pipeline 8 --size 1024 --duration "$DURATION" \
    --warmup 1s >"$DIR/bench.out" 2>&1 &
BENCH_PID=$!

MAX=0
START=$SECONDS
while kill -0 "$BENCH_PID" 2>/dev/null; do
    wal=$(stat -c %s "$STORE-wal" 2>/dev/null || echo 0)
    db=$(stat -c %s "$STORE" 2>/dev/null || echo 0)
    ((wal > MAX)) && MAX=$wal
    echo "$((SECONDS - START)) $wal $db"
    sleep "$INTERVAL"
done
wait "$BENCH_PID" || { cat "$DIR/bench.out"; exit 1; }
cat "$DIR/bench.out"
echo "largest WAL: $MAX bytes"
