#!/usr/bin/env bash
# Builds the Kotlin notes app (the Rust library, its generated Kotlin bindings, then Notes.kt)
# and runs it with the given arguments. Needs what client/ffi/test.sh installs: the Kotlin
# compiler (npm) and JNA (Debian's libjna-java); run that once first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KOTLIN="$ROOT/client/ffi/kotlin/node_modules/kotlin-compiler"
OUT="$ROOT/target/bindings/notes-kotlin"
CP="/usr/share/java/jna.jar:$KOTLIN/lib/kotlinx-coroutines-core-jvm.jar"
cd "$ROOT"
cargo build --quiet -p cubby-ffi -p cubby-uniffi-bindgen
if [ ! -f "$OUT/notes.jar" ] || [ "$0" -nt "$OUT/notes.jar" ] \
    || [ examples/kotlin/Notes.kt -nt "$OUT/notes.jar" ] \
    || [ target/debug/libcubby_ffi.so -nt "$OUT/notes.jar" ]; then
    rm -rf "$OUT" && mkdir -p "$OUT"
    target/debug/uniffi-bindgen generate --no-format --library target/debug/libcubby_ffi.so \
        --language kotlin --out-dir "$OUT/src" >/dev/null
    "$KOTLIN/bin/kotlinc" -nowarn -jvm-target 17 -cp "$CP" -d "$OUT/notes.jar" \
        "$OUT/src/dev/cubby/cubby.kt" examples/kotlin/Notes.kt
fi
exec java -Djna.library.path="$ROOT/target/debug" -cp "$OUT/notes.jar:$KOTLIN/lib/kotlin-stdlib.jar:$CP" \
    dev.cubby.examples.NotesKt "$@"
