#!/usr/bin/env bash
# Server CPU (user and system) and minor page faults per message, for one server under one
# load: counts that a shared machine disturbs less than throughput does (the other processes
# still take cache and memory bandwidth: compare servers in interleaved runs). The S4 load by
# default; `benches/thread_cpu.sh` does the measuring (per thread, and the "all threads" line).
#
# Usage: benches/cpu_per_message.sh [DURATION] -- SERVER_CMD...
#   e.g. benches/cpu_per_message.sh 3s -- target/release/mllp-reactor serve --no-store --listen 127.0.0.1:0
#        benches/cpu_per_message.sh 3s -- target/release/examples/baseline_server 127.0.0.1:0
# The server must print `listening on ADDR` (or just ADDR) as its first stdout line. A 1 s run
# before the measured one warms it (buffers grown, pools filled).
#
# Environment:
#   BENCH_ARGS=...   the load (default S4: --conns 4 --pipeline 1 --size 1048576)

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-3s}
shift
[[ ${1:-} == -- ]] && shift
SERVER_CMD="$*" BENCH_ARGS=${BENCH_ARGS:---conns 4 --pipeline 1 --size 1048576} \
    exec benches/thread_cpu.sh "$DURATION"
