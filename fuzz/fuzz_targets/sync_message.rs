//! Fuzzes `cubby_fuzz::sync_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::sync_message(data));
