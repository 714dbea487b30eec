//! Fuzzes `cubby_fuzz::sealed_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cubby_fuzz::sealed_record(data));
