#!/usr/bin/env bash
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
# Fuzzes each Cubby target (default: all) for SECONDS each (default 60) on the machine's stable toolchain
# (cargo-fuzz in `--sanitizer none` mode), then prints executions per target. Crashes land in
# fuzz/artifacts/<target>/; keep each one as a regression by copying it to
# fuzz/regressions/<target>/, which `cargo test` replays.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_frame sync_message graph_sync graph_ops token sealed_record)
cargo fuzz build --sanitizer none
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    # Start from the kept inputs.
    cp -n regressions/"$target"/* "corpus/$target/" 2>/dev/null || true
    log="artifacts/$target.log"
    status=0
    cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    crashes=$(find "artifacts/$target" -type f | wc -l)
    echo "$target: $runs executions in ${seconds}s, exit $status, $crashes crash files"
done
