#!/usr/bin/env bash
# Off-CPU and syscall profile of one durable server under one load (issue #21): what a store
# server pays per message, in counts that stay put on a shared, noisy machine.
#
# Usage: benches/durable_profile.sh MODE SERVER_COMMAND...
#
#   MODE        syscalls  strace -f -c: system calls per message, all threads
#               threads   CPU time per message (user + system µs) of each server thread, the
#                         time it waited for a CPU while runnable (schedstat), and how often
#                         it slept (voluntary context switches)
#               files     strace -f -y: fsync and pwrite64 per thread and file (who copies
#                         WAL pages into the database: the writer on the commit path, or the
#                         checkpointer), and the WAL sync latencies
#   SERVER_COMMAND        prints `listening on ADDR` first; `{store}` becomes a fresh store
#                         path, e.g. `target/release/mllp-reactor serve --store {store}
#                         --listen 127.0.0.1:0` or `target/release/examples/durable_baseline
#                         {store} 127.0.0.1:0 --checkpoint auto`
#
# Environment: CONNS=1 PIPELINE=1 (S1; S3 is CONNS=50 PIPELINE=8), DURATION=3s, OUT=directory
# for the store, logs and reports (default target/durable-profile/<mode>-<time>, deleted store
# files excepted). Needs strace (apt-get install strace) for syscalls and files, jq, and a
# release build (cargo build --release -p mllp-reactor-cli --bins --examples).

set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:?usage: benches/durable_profile.sh syscalls|threads|files SERVER_COMMAND...}
shift
(($# > 0)) || { echo "durable_profile: no server command" >&2; exit 2; }
CONNS=${CONNS:-1}
PIPELINE=${PIPELINE:-1}
DURATION=${DURATION:-3s}
OUT=${OUT:-target/durable-profile/$MODE-$(date +%H%M%S)}
BENCH=target/release/mllp-reactor
[[ -x $BENCH ]] || { echo "durable_profile: build $BENCH first" >&2; exit 1; }
command -v jq >/dev/null || { echo "durable_profile: jq is required" >&2; exit 1; }
mkdir -p "$OUT"
rm -f "$OUT"/s.db "$OUT"/s.db-wal "$OUT"/s.db-shm "$OUT"/s.db-search*
cmd=("${@//\{store\}/$OUT/s.db}")

case $MODE in
    syscalls) tracer=(strace -f -c -o "$OUT/strace.txt") ;;
    files) tracer=(strace -f -y -T -e trace=fsync,fdatasync,pwrite64 -o "$OUT/strace.txt") ;;
    threads) tracer=() ;;
    *) echo "durable_profile: MODE must be syscalls, threads or files" >&2; exit 2 ;;
esac
if ((${#tracer[@]} > 0)); then
    command -v strace >/dev/null || { echo "durable_profile: strace is required" >&2; exit 1; }
fi

"${tracer[@]}" "${cmd[@]}" >"$OUT/server.stdout" 2>"$OUT/server.stderr" &
top=$!
trap 'kill -KILL $top 2>/dev/null || true; rm -f "$OUT"/s.db "$OUT"/s.db-wal "$OUT"/s.db-shm "$OUT"/s.db-search*' EXIT
for _ in $(seq 300); do
    grep -q '^listening on ' "$OUT/server.stdout" 2>/dev/null && break
    sleep 0.1
done
addr=$(sed -n 's/^listening on //p' "$OUT/server.stdout" | head -n 1)
[[ -n $addr ]] || { echo "durable_profile: the server printed no address" >&2; exit 1; }
# The server's own pid: the tracer's child when traced.
server=$top
if ((${#tracer[@]} > 0)); then server=$(pgrep -P "$top" | head -n 1); fi

"$BENCH" bench --to "$addr" --conns "$CONNS" --pipeline "$PIPELINE" --size 1024 \
    --duration "$DURATION" --warmup 0s --json >"$OUT/bench.json" 2>"$OUT/bench.stderr"
messages=$(jq .messages "$OUT/bench.json")
if [[ $MODE == threads ]]; then
    for t in /proc/"$server"/task/*; do
        # utime stime (ticks), then schedstat's time waiting on a run queue (ns) and
        # status's voluntary context switches (the thread slept: a lock, a sync, a wake-up).
        echo "$(tr ' ' _ <"$t/comm") $(awk '{print $14, $15}' "$t/stat") $(awk '{print $2}' "$t/schedstat") $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")"
    done >"$OUT/threads.txt"
fi
# SIGKILL the server itself; strace then writes its summary and exits.
kill -KILL "$server" 2>/dev/null || true
wait "$top" 2>/dev/null || true

echo "# $MODE: ${cmd[*]}"
echo "# load: --conns $CONNS --pipeline $PIPELINE, $DURATION: $messages messages," \
    "$(jq '.msgs_per_sec | round' "$OUT/bench.json") msg/s, p50 $(jq '.p50_us | round' "$OUT/bench.json") µs;" \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)"
case $MODE in
    syscalls)
        # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall.
        awk -v n="$messages" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
            printf "%-16s %9d calls %8.2f per message\n", $NF, $4, $4 / n }' "$OUT/strace.txt" |
            sort -k4 -nr
        ;;
    threads)
        awk -v n="$messages" -v hz="$(getconf CLK_TCK)" '{
            printf "%-16s %6.1f µs user + %6.1f µs system per message, %6.1f µs runnable but not running, %5.2f sleeps\n", $1, $2 * 1e6 / hz / n, $3 * 1e6 / hz / n, $4 / 1e3 / n, $5 / n
            total += $2 + $3 } END { printf "%-16s %6.1f µs per message\n", "all threads", total * 1e6 / hz / n }' \
            "$OUT/threads.txt"
        ;;
    files)
        echo "calls per thread id and file:"
        grep -oE '^[0-9]+ +(fsync|fdatasync|pwrite64)\([0-9]+<[^>]*>' "$OUT/strace.txt" |
            sed -E 's/ +/ /; s/\([0-9]+</ /; s/>$//' | sort | uniq -c | sort -k2,2n -k1,1nr
        echo "WAL sync latency (µs):"
        grep -E '(fsync|fdatasync)\([0-9]+<[^>]*-wal>\) += 0 <' "$OUT/strace.txt" |
            sed -E 's/.*<([0-9.]+)>$/\1/' | sort -n |
            awk '{ v[NR] = $1 * 1e6 } END { if (NR) printf "n=%d p10 %.0f median %.0f p90 %.0f\n", NR, v[int(NR * 0.1) + 1], v[int(NR * 0.5) + 1], v[int(NR * 0.9) + 1] }'
        ;;
esac
