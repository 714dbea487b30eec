//! Fuzzes `cubby_fuzz::graph_sync`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::graph_sync(data));
