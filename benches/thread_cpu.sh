#!/usr/bin/env bash
# CPU time of each thread of a server (user and system, from /proc/PID/task/TID/stat), per
# message, under a load: what callgrind cannot show (it counts user-space instructions
# only, and a durable server spends most of its CPU in the kernel). Issue #21.
#
# Usage: benches/thread_cpu.sh [DURATION]     (default 5s, after a 1s warmup that is not counted)
# Needs the release build (cargo build --release -p mllp-reactor-cli --examples).
#
# Environment:
#   SERVER_CMD=...  the server (default `serve --store` on a fresh file in a temporary folder;
#                   `{store}` in it is replaced by that file, e.g. the durable baseline:
#                   SERVER_CMD="target/release/examples/durable_baseline {store} 127.0.0.1:0 --checkpoint auto")
#   BENCH_ARGS=...  the load (default S3: --conns 50 --pipeline 8 --size 1024)
#
# Prints messages/s and, per thread (id and name) and for all of them, user and system µs per
# message, the share of the run the thread spent runnable but waiting for a CPU (the
# scheduler's run-queue delay, /proc/PID/task/TID/schedstat), and its context switches per
# 1 000 messages: sleeps (voluntary) and preemptions (/proc/PID/task/TID/status); then the process's minor page
# faults per message and how busy the machine's CPUs were (all processes, /proc/stat), which
# tells a server short of CPU from one waiting on something else. Clock ticks are 10 ms: at
# ~50 000 messages/s over 5 s one tick is 0.04 µs per message.

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-5s}
DIR=$(mktemp -d)
STORE=$DIR/store.db
DEFAULT_SERVER_CMD='target/release/mllp-reactor serve --store {store} --listen 127.0.0.1:0'
SERVER_CMD=${SERVER_CMD:-$DEFAULT_SERVER_CMD}
SERVER_CMD=${SERVER_CMD//'{store}'/$STORE}
BENCH_ARGS=${BENCH_ARGS:---conns 50 --pipeline 8 --size 1024}
TICK=$(getconf CLK_TCK)

# shellcheck disable=SC2086 # SERVER_CMD is a list of words on purpose
$SERVER_CMD >"$DIR/stdout" 2>"$DIR/stderr" &
SERVER=$!
trap 'kill -KILL $SERVER 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 600); do
    [[ -s $DIR/stdout ]] && break
    sleep 0.1
done
ADDR=$(head -n 1 "$DIR/stdout")
ADDR=${ADDR#listening on }
# Each thread as `TID_NAME utime stime run_delay_ns voluntary preempted` (stat fields 14 and
# 15, schedstat's second, status's context switches; the name has no spaces in it here, but
# is made safe anyway).
snapshot() {
    for task in /proc/"$SERVER"/task/*; do
        echo "${task##*/}_$(tr ' ' _ <"$task/comm") $(cut -d ')' -f 2 "$task/stat" | awk '{ print $12, $13 }') $(cut -d ' ' -f 2 "$task/schedstat") $(awk '/ctxt_switches/ { printf "%s ", $2 }' "$task/status")"
    done | sort
}
# The machine's CPU time as `busy total` in ticks (/proc/stat's first line; idle and iowait
# are not busy).
machine() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
target/release/mllp-reactor bench --to "$ADDR" $BENCH_ARGS --duration 1s --warmup 0s --json >/dev/null
# Minor page faults of the whole process (field 10 of /proc/PID/stat).
faults() { cut -d ')' -f 2 "/proc/$SERVER/stat" | awk '{ print $8 }'; }
snapshot >"$DIR/before"
FAULTS0=$(faults)
MACHINE0=$(machine)
NS0=$(date +%s%N)
# shellcheck disable=SC2086
target/release/mllp-reactor bench --to "$ADDR" $BENCH_ARGS --duration "$DURATION" --warmup 0s \
    --json >"$DIR/run.json"
NS1=$(date +%s%N)
MACHINE1=$(machine)
snapshot >"$DIR/after"
FAULTS1=$(faults)
MSGS=$(jq '.messages' "$DIR/run.json")
echo "messages: $MSGS, $(jq '.msgs_per_sec' "$DIR/run.json")/s ($SERVER_CMD; $BENCH_ARGS)"
echo "µs per message: user system | waiting for a CPU, % of the run | per 1000 messages: sleeps preemptions | thread"
join "$DIR/before" "$DIR/after" | awk -v n="$MSGS" -v tick="$TICK" -v ns=$((NS1 - NS0)) '{
    u = ($7 - $2) / tick * 1e6 / n; s = ($8 - $3) / tick * 1e6 / n; w = ($9 - $4) / ns * 100
    v = ($10 - $5) * 1000 / n; p = ($11 - $6) * 1000 / n
    tu += u; ts += s
    if (u + s > 0) printf "%20.2f %6.2f | %6.1f %% | %7.1f %7.1f | %s\n", u, s, w, v, p, $1 }
    END { printf "%20.2f %6.2f | all threads\n", tu, ts }'
awk -v n="$MSGS" -v f=$((FAULTS1 - FAULTS0)) 'BEGIN { printf "minor faults per message: %.2f\n", f / n }'
read -r BUSY0 TOTAL0 <<<"$MACHINE0"
read -r BUSY1 TOTAL1 <<<"$MACHINE1"
awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) -v cpus="$(nproc)" \
    'BEGIN { printf "machine busy: %.0f %% of %d CPUs (server, load generator and the rest)\n", 100 * b / t, cpus }'
