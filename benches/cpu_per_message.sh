#!/usr/bin/env bash
# Server CPU (user and system, from /proc/PID/stat) and minor page faults per message, for one
# server under one load: counts that a shared machine disturbs less than throughput does (the
# other processes still take cache and memory bandwidth: compare servers in interleaved runs).
#
# Usage: benches/cpu_per_message.sh [DURATION] -- SERVER_CMD...
#   e.g. benches/cpu_per_message.sh 3s -- target/release/mllp-reactor serve --no-store --listen 127.0.0.1:0
#        benches/cpu_per_message.sh 3s -- target/release/examples/baseline_server 127.0.0.1:0
# The server must print `listening on ADDR` as its first stdout line. A 1 s run before the
# measured one warms it (buffers grown, pools filled).
#
# Environment:
#   BENCH_ARGS=...   the load (default S4: --conns 4 --pipeline 1 --size 1048576)

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-3s}
shift
[[ ${1:-} == -- ]] && shift
BENCH_ARGS=${BENCH_ARGS:---conns 4 --pipeline 1 --size 1048576}
OUT=$(mktemp)
"$@" >"$OUT" 2>/dev/null &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$OUT"' EXIT
for _ in $(seq 300); do
    [[ -s $OUT ]] && break
    sleep 0.1
done
ADDR=$(head -n 1 "$OUT")
ADDR=${ADDR#listening on }
stat_of() { awk '{ print $10, $14, $15 }' "/proc/$SERVER/stat"; }
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
target/release/mllp-reactor bench --to "$ADDR" $BENCH_ARGS --duration 1s --warmup 0s --json >/dev/null
read -r faults0 user0 sys0 < <(stat_of)
# shellcheck disable=SC2086
MSGS=$(target/release/mllp-reactor bench --to "$ADDR" $BENCH_ARGS --duration "$DURATION" \
    --warmup 0s --json 2>/dev/null | jq '.messages')
read -r faults1 user1 sys1 < <(stat_of)
awk -v m="$MSGS" -v f=$((faults1 - faults0)) -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) \
    -v hz="$(getconf CLK_TCK)" 'BEGIN {
    printf "messages %d, per message: user %.1f us, system %.1f us, minor faults %.2f\n",
        m, u / hz / m * 1e6, s / hz / m * 1e6, f / m }'
