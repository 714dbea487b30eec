#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: `bash tests/run.sh`): the workspace's Rust tests,
# then the Python and Kotlin bindings' tests and the Swift bindings' freshness check, which
# install what they need on first use (client/ffi/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test --workspace"
cargo test --workspace
bash client/ffi/test.sh
