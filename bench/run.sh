#!/usr/bin/env bash
# Builds Cubby in release mode and runs the whole benchmark: Cubby's workloads against the real
# server binary, and the limits they are measured against, in one run. JSON lines go to
# bench/results/<time>.jsonl (and stdout); the summary and the machine's load go to stderr.
#
#   bench/run.sh            # everything (about two minutes after the build)
#   bench/run.sh --quick    # a tenth of the work, to check that it runs
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p cubby-server -p cubby-bench
mkdir -p bench/results
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
{
  echo "machine: $(nproc) cores, $(uname -sr)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >&2
target/release/cubby-bench all "$@" | tee "$out"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "results: $out" >&2
