//! Fuzzes `cubby_fuzz::client_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::client_frame(data));
