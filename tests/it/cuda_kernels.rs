//! The CUDA forward's kernels (`kernels/bert.cu`) run without a GPU: compiled as C++ with
//! `kernels/host/shim.h` (blocks of real threads, barriers for `__syncthreads` and warp shuffles,
//! `_Float16` for `__half`) and checked by `kernels/host/test_kernels.cpp` against plain
//! double-precision references on random inputs. Needs g++ ≥ 11 (C++20 `<barrier>`); `.ci/run`
//! installs it when missing.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_references_on_the_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("test_kernels");
    let compile = Command::new("g++")
        .args(["-std=c++20", "-O2", "-pthread", "-w", "-x", "c++"])
        .arg(format!("-I{}", root.join("kernels/host").display()))
        .arg(root.join("kernels/host/test_kernels.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("g++ (C++20) is needed to run the CUDA kernels on the host");
    assert!(
        compile.status.success(),
        "g++ failed:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let run = Command::new(&exe).output().expect("run test_kernels");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(run.status.success(), "kernel checks failed:\n{stdout}");
    for kernel in [
        "embed_layer_norm",
        "residual_layer_norm",
        "attention",
        "mean_pool_normalise",
    ] {
        assert!(stdout.contains(kernel), "{kernel} was checked:\n{stdout}");
    }
}
