#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: `bash tests/run.sh`): starts a throwaway
# PostgreSQL for the PostgreSQL backend's tests (installing Debian's postgresql-15 if missing,
# tests/postgres.sh) and HAProxy for the cluster test, runs the workspace's Rust tests, then the Python and Kotlin bindings'
# tests and the Swift bindings' freshness check, which install what they need on first use
# (client/ffi/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/postgres.sh
postgres_start
haproxy_install
trap postgres_stop EXIT
echo "== cargo test --workspace"
cargo test --workspace
bash client/ffi/test.sh
