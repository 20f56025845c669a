//! With the `cuda` feature, compiles samkv's own kernels (src/model/cuda/kernels.cu) to PTX
//! with nvcc; the CPU build needs nothing. scripts/build-cuda.sh sets up nvcc (NVCC or
//! CUDA_ROOT) and the target GPU (CUDA_COMPUTE_CAP, default 90).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/model/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
        Ok(root) => format!("{root}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("samkv_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("src/model/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run nvcc (`{nvcc}`): {e}; use scripts/build-cuda.sh"));
    assert!(status.success(), "nvcc failed on src/model/cuda/kernels.cu");
}
