#!/usr/bin/env bash
# The bindings' tests: Python (pytest) and Kotlin (JUnit on the JVM) end to end against a real
# cubby-server, and a check that the Swift bindings kept in the repo are what the code generates.
#
# Installs what it needs on first use, under target/bindings (nothing outside the repo but
# Debian's packages): maturin and pytest from PyPI in a virtual environment, the Kotlin compiler
# from npm (client/ffi/kotlin/package-lock.json), and JNA and JUnit 4 from Debian (apt-get, as
# root or through sudo). Run from anywhere: `bash client/ffi/test.sh`.
#
#   --regenerate-swift   rewrite client/ffi/swift's generated files after an API change
set -euo pipefail
FFI="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$FFI/../.." && pwd)"
TOOLS="$ROOT/target/bindings"
LIB="$ROOT/target/debug/libcubby_ffi.so"
BINDGEN="$ROOT/target/debug/uniffi-bindgen"
mkdir -p "$TOOLS"
cd "$ROOT"

say() { printf '== %s  (%s)\n' "$*" "$(date +%T)"; }

# --- Tools -----------------------------------------------------------------------------------

ensure_debian_packages() {
    local missing=()
    [ -f /usr/share/java/jna.jar ] || missing+=(libjna-java)
    [ -f /usr/share/java/junit4.jar ] || missing+=(junit4)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]} from Debian's packages"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

ensure_python_tools() {
    local venv="$TOOLS/venv"
    if [ ! -x "$venv/bin/maturin" ] || [ ! -x "$venv/bin/pytest" ]; then
        say "installing maturin and pytest into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check maturin==1.16.0 pytest==9.2.0
    fi
}

ensure_kotlin() {
    if [ ! -x "$FFI/kotlin/node_modules/kotlin-compiler/bin/kotlinc" ]; then
        say "installing the Kotlin compiler from npm"
        (cd "$FFI/kotlin" && npm ci --no-audit --no-fund --silent)
    fi
}

# --- Build -----------------------------------------------------------------------------------

# The whole workspace with its tests, as `cargo test --workspace` builds it: after that, nothing
# to do (building only the three packages needed would resolve other features, and rebuild).
build() {
    say "building the workspace (cubby-server, cubby-ffi and uniffi-bindgen among it)"
    cargo build --quiet --workspace --lib --bins --tests --examples
}

# --- Python ----------------------------------------------------------------------------------

test_python() {
    say "python: maturin develop, then pytest"
    local venv="$TOOLS/venv"
    (cd "$FFI" && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet)
    CUBBY_SERVER_BIN="$ROOT/target/debug/cubby-server" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "$FFI/python/tests"
}

# --- Kotlin ----------------------------------------------------------------------------------

test_kotlin() {
    say "kotlin: generate the bindings, compile them with the tests, run JUnit"
    local out="$TOOLS/kotlin" kotlin="$FFI/kotlin/node_modules/kotlin-compiler"
    rm -rf "$out" && mkdir -p "$out"
    "$BINDGEN" generate --no-format --library "$LIB" --language kotlin --out-dir "$out/src" \
        >/dev/null
    local deps="/usr/share/java/jna.jar:$kotlin/lib/kotlinx-coroutines-core-jvm.jar"
    deps+=":/usr/share/java/junit4.jar:/usr/share/java/hamcrest-core.jar"
    deps+=":$kotlin/lib/kotlin-test.jar:$kotlin/lib/kotlin-test-junit.jar"
    "$kotlin/bin/kotlinc" -nowarn -jvm-target 17 -cp "$deps" -d "$out/tests.jar" \
        "$out/src/dev/cubby/cubby.kt" "$FFI/kotlin/test/CubbyTest.kt"
    CUBBY_SERVER_BIN="$ROOT/target/debug/cubby-server" java \
        -Djna.library.path="$(dirname "$LIB")" \
        -cp "$out/tests.jar:$kotlin/lib/kotlin-stdlib.jar:$deps" \
        org.junit.runner.JUnitCore dev.cubby.test.CubbyTest
}

# The Kotlin notes app in examples/: a note added on one device is listed on another.
test_kotlin_example() {
    say "kotlin: the notes example against a real server"
    local dir url
    dir="$(mktemp -d)"
    "$ROOT/target/debug/cubby-server" --data "$dir/server" --listen 127.0.0.1:0 \
        >"$dir/server.out" 2>"$dir/server.log" &
    local server=$!
    trap 'kill $server 2>/dev/null || true' RETURN
    for _ in $(seq 1500); do
        url="$(sed -n 's/^cubby-server listening on //p' "$dir/server.out")"
        [ -n "$url" ] && break
        kill -0 $server || { cat "$dir/server.log"; return 1; }
        sleep 0.02
    done
    [ -n "$url" ] || { echo "cubby-server did not start" >&2; return 1; }
    export CUBBY_SERVER="$url" CUBBY_CA="$dir/server/tls/cert.pem"
    export CUBBY_TOKEN_COMMAND="$ROOT/target/debug/cubby-server dev-token --data $dir/server --customer alice"
    local added listed
    added="$(NOTES_DIR="$dir/phone" "$ROOT/examples/kotlin/run.sh" add buy milk)"
    listed="$(NOTES_DIR="$dir/laptop" "$ROOT/examples/kotlin/run.sh" list)"
    echo "$listed"
    grep -qF "${added#added }  [ ] buy milk" <<<"$listed" \
        || { echo "the laptop does not list the phone's note" >&2; return 1; }
    kill $server && wait $server || true
    rm -rf "$dir"
}

# --- Swift -----------------------------------------------------------------------------------

# The generated files as SwiftPM wants them: the module map renamed, the header beside it.
generate_swift() {
    local into="$1" raw
    raw="$(mktemp -d)"
    "$BINDGEN" generate --no-format --library "$LIB" --language swift --out-dir "$raw" >/dev/null
    mkdir -p "$into/Sources/Cubby" "$into/Sources/CubbyFFI/include"
    cp "$raw/Cubby.swift" "$into/Sources/Cubby/Cubby.swift"
    cp "$raw/CubbyFFI.h" "$into/Sources/CubbyFFI/include/CubbyFFI.h"
    cp "$raw/CubbyFFI.modulemap" "$into/Sources/CubbyFFI/include/module.modulemap"
    rm -rf "$raw"
}

check_swift() {
    say "swift: the bindings in client/ffi/swift are what the code generates"
    local fresh
    fresh="$(mktemp -d)"
    generate_swift "$fresh"
    if ! diff -ru "$FFI/swift/Sources" "$fresh/Sources" --exclude=shim.c; then
        echo "client/ffi/swift is stale: run 'bash client/ffi/test.sh --regenerate-swift' and commit" >&2
        exit 1
    fi
    rm -rf "$fresh"
}

if [ "${1:-}" = "--regenerate-swift" ]; then
    build
    generate_swift "$FFI/swift"
    say "regenerated client/ffi/swift/Sources"
    exit 0
fi

ensure_debian_packages
ensure_python_tools
ensure_kotlin
build
check_swift
test_python
test_kotlin
test_kotlin_example
say "bindings: all passed"
