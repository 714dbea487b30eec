//! `uniffi-bindgen` at the UniFFI version `cubby-ffi` is built with: the generated bindings must
//! come from the same version as the scaffolding in the library, so neither maturin's nor
//! PyPI's copy is used (`uniffi-bindgen generate --library target/debug/libcubby_ffi.so ...`).

fn main() {
    uniffi::uniffi_bindgen_main()
}
