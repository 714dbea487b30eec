//! Fuzzes `cubby_fuzz::graph_ops`.
#![no_main]

static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on every panic, even one caught: the graph asks Automerge about
    // elements under `catch_unwind` (Automerge asserts on some questions), and that is not a
    // crash. A panic that escapes the target still aborts, as libfuzzer-sys catches it.
    // (Taking the hook puts back Rust's default, which prints the panic and returns.)
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    cubby_fuzz::graph_ops(data)
});
