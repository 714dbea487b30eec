//! Compiles the echo service of the transport floor with protox (no `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("echo.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    // The same codec as Cubby's services (small starting buffers), so the floor is the transport's.
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("cubby_proto::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
