//! With the `cuda` feature, compiles samkv's own kernels (src/cuda/kernels.cu) to PTX
//! with nvcc, and for a Hopper target (CUDA_COMPUTE_CAP 90) also the wgmma attention
//! (src/cuda/flash_sm90.cu, for compute_90a: other targets get an empty file and keep
//! the mma.sync attention); the CPU build needs nothing. scripts/build-cuda.sh sets up nvcc (NVCC or
//! CUDA_ROOT) and the target GPU (CUDA_COMPUTE_CAP, default 90).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for f in ["kernels.cu", "flash_sm90.cu", "flash.cuh", "common.cuh"] {
        println!("cargo:rerun-if-changed=src/cuda/{f}");
    }
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
    let compile = |src: &str, arch: &str, ptx: &str| {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(out.join(ptx))
            .arg(format!("src/cuda/{src}"))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run nvcc (`{nvcc}`): {e}; use scripts/build-cuda.sh")
            });
        assert!(status.success(), "nvcc failed on src/cuda/{src}");
    };
    compile("kernels.cu", &format!("compute_{cap}"), "samkv_kernels.ptx");
    if cap == "90" {
        compile("flash_sm90.cu", "compute_90a", "samkv_sm90.ptx");
    } else {
        std::fs::write(out.join("samkv_sm90.ptx"), "").expect("OUT_DIR is writable");
    }
}
