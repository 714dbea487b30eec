#!/usr/bin/env bash
# Installs the peers cubby-bench compares Cubby with, from the npm registry and crates.io, at the
# versions pinned here and in package-lock.json / samod-server/Cargo.lock:
#   - @automerge/automerge-repo 2.5.6 (server and clients), yjs and y-websocket (clients), under
#     bench/peers/node_modules;
#   - y-sweet 0.9.1 (cargo install) and samod 0.16.0 (samod-server/), under target/peers.
# About ten minutes on 2 cores the first time; nothing when already installed.
set -euo pipefail
cd "$(dirname "$0")"
tools=../../target/peers
# `npm install`, not `npm ci`: the lock leaves out cbor-extract's optional per-platform builds.
[ -d node_modules ] || npm install --no-audit --no-fund --ignore-scripts
[ -x "$tools/bin/y-sweet" ] ||
  CARGO_TARGET_DIR="$tools/build" cargo install y-sweet --version 0.9.1 --locked --root "$tools"
CARGO_TARGET_DIR="$tools/build" cargo build --release --locked --manifest-path samod-server/Cargo.toml
cp "$tools/build/release/samod-server" "$tools/samod-server"
