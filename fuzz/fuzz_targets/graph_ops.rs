//! Fuzzes `cubby_fuzz::graph_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::graph_ops(data));
