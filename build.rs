//! Compiles `proto/` with protox (pure Rust: no `protoc` to install) and writes the descriptor set
//! that gRPC reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/promptradar/v1/radar.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("promptradar_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
