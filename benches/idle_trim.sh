#!/usr/bin/env bash
# Where a durable server's anonymous memory per idle connection goes (BENCHMARKS.md, "Durable
# idle1000"): starts SERVER (a command line; {store} is replaced by a fresh store path), then
# BATCHES times opens 1 000 idle connections (one message each, as `benches/e2e.sh idle1000`
# does) and prints the server's anonymous memory (smaps_rollup) after each batch and again
# after glibc's malloc_trim(0) in the server (through gdb): what the trim gives back was freed
# heap still resident, not memory any connection holds.
#
# Usage: benches/idle_trim.sh [SERVER...]
#   default SERVER: target/release/mllp-reactor serve --store {store} --listen 127.0.0.1:0
#   e.g. benches/idle_trim.sh target/release/examples/durable_baseline {store} 127.0.0.1:0
# Env: BIN (the bench client, default target/release/mllp-reactor), BATCHES (default 3).
# Needs gdb (apt-get install gdb).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mllp-reactor}
BATCHES=${BATCHES:-3}
if [[ $# -eq 0 ]]; then
  set -- target/release/mllp-reactor serve --store '{store}' --listen 127.0.0.1:0
fi
command -v gdb >/dev/null || { echo "idle_trim: gdb not found (apt-get install gdb)" >&2; exit 1; }
dir=$(mktemp -d /tmp/idle-trim.XXXXXX)
args=()
for a in "$@"; do args+=("${a//\{store\}/$dir/store.db}"); done
"${args[@]}" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
addr=
for _ in $(seq 100); do
  addr=$(grep -oE 'listening on [0-9.]+:[0-9]+' "$dir/server.log" | head -1 | cut -d' ' -f3 || true)
  [[ -n $addr ]] && break
  sleep 0.1
done
[[ -n $addr ]] || { echo "idle_trim: the server did not start:" >&2; cat "$dir/server.log" >&2; exit 1; }
anon() { awk '/^Anonymous:/ {print $2}' "/proc/$pid/smaps_rollup"; }
echo "start: anonymous $(anon) kB"
for b in $(seq "$BATCHES"); do
  per=$("$BIN" bench --to "$addr" --conns 1 --idle 1000 --server-pid "$pid" --duration 300ms \
    --warmup 0s 2>&1 | grep -oE 'RSS per idle conn [-0-9]+ B' || echo '?')
  after=$(anon)
  gdb -q -batch -p "$pid" -ex 'call (int)malloc_trim(0)' >/dev/null 2>&1
  echo "batch $b: $per; anonymous $after kB, after malloc_trim $(anon) kB"
done
