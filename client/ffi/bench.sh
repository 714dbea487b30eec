#!/usr/bin/env bash
# The bindings' measurements in one run (release builds): the shared library's size, stripped;
# then, against one release cubby-server, the Rust SDK's figures (examples/sdk_latency.rs)
# and the Python binding's (python/bench.py) for the same workload. Needs the tools
# client/ffi/test.sh installs. `EDITS=1000 bash client/ffi/bench.sh`
set -euo pipefail
FFI="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$FFI/../.." && pwd)"
VENV="$ROOT/target/bindings/venv"
cd "$ROOT"

echo "== building (release)"
cargo build --release --quiet -p cubby-server -p cubby-ffi --example sdk_latency
(cd "$FFI" && VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" maturin develop --release --quiet)

lib="$ROOT/target/release/libcubby_ffi.so"
stripped="$(mktemp)"
strip -o "$stripped" "$lib"
echo "libcubby_ffi.so ($(uname -m) Linux, release): $(stat -c %s "$lib") bytes, stripped $(stat -c %s "$stripped") bytes"
rm -f "$stripped"

dir="$(mktemp -d)"
target/release/cubby-server --data "$dir/server" --listen 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1500); do
    url="$(sed -n 's/^cubby-server listening on //p' "$dir/server.out")"
    [ -n "$url" ] && break
    sleep 0.02
done
export CUBBY_SERVER="$url" CUBBY_CA="$dir/server/tls/cert.pem" BENCH_DIR="$dir"
export EDITS="${EDITS:-1000}"
# One customer each, so that neither's cold start syncs the other's documents.
tokens="$ROOT/target/release/cubby-server dev-token --data $dir/server --customer"
CUBBY_TOKEN_COMMAND="$tokens rust" target/release/examples/sdk_latency
CUBBY_TOKEN_COMMAND="$tokens python" "$VENV/bin/python" "$FFI/python/bench.py"
