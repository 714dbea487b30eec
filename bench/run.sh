#!/usr/bin/env bash
# Builds Cubby in release mode, installs the peers (bench/peers/install.sh: once, about ten
# minutes), and runs the whole benchmark in one run: Cubby's workloads against the real server
# binary, the same fan-out and idle workloads against automerge-repo, samod and y-sweet, and the
# limits they are all measured against. JSON lines go to bench/results/<time>.jsonl (and stdout);
# the summary and the machine's load go to stderr.
#
#   bench/run.sh            # everything (about eight minutes after the builds)
#   bench/run.sh --quick    # a tenth of the work, to check that it runs
set -euo pipefail
cd "$(dirname "$0")/.."
bench/peers/install.sh
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
