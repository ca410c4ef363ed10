//! Compiles `proto/` with protox (pure Rust: no `protoc` to install) and writes the descriptor set
//! that gRPC reflection serves. With the `cuda` feature, also compiles `kernels/bert.cu` to PTX
//! with nvcc (from `CUDA_HOME`/bin or `PATH`; `make cuda` provides it) for `CUDA_COMPUTE_CAP`
//! (default 90).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/promptradar/v1/radar.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("promptradar_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels(&out)?;
    }
    Ok(())
}

/// `kernels/bert.cu` → `$OUT_DIR/bert.ptx`.
fn compile_kernels(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let source = "kernels/bert.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let ptx = out.join("bert.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(&ptx)
        .status()
        .map_err(|e| {
            format!(
                "{}: {e} (the cuda feature needs nvcc: run `make cuda`, or source \
                 .cuda/toolchain/env.sh after scripts/cuda-toolchain.sh)",
                nvcc.display()
            )
        })?;
    if !status.success() {
        return Err(format!("{} failed on {source}: {status}", nvcc.display()).into());
    }
    Ok(())
}
