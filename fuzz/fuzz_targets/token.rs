//! Fuzzes `cubby_fuzz::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::token(data));
