//! Compiles `proto/cubby/v1/*.proto` with protox (no `protoc` needed) and writes the encoded
//! descriptor set for the reflection service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files: Vec<PathBuf> = ["sync", "account", "admin", "common"]
        .iter()
        .map(|f| root.join(format!("cubby/v1/{f}.proto")))
        .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("cubby_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // No generated `connect` constructors: they would clash with the `Connect` RPC, and clients
    // build their own TLS channel anyway. Payload-carrying messages get a hand-written Debug.
    // Every call uses `codec::LeanCodec` (small starting buffers; see there).
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::LeanCodec")
        .skip_debug(["cubby.v1.DocSync", "cubby.v1.ExportChunk", "cubby.v1.Edit"])
        .compile_fds(fds)?;
    Ok(())
}
