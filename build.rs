//! Compiles the CUDA kernels in src/model/ops/cuda/:
//! - with `--features cuda`, by nvcc into fatbins holding sm_90 SASS (H100/H200 start
//!   without a JIT wait) and compute_80 PTX (any other GPU from A100 on JIT-compiles it);
//! - in debug builds (`cargo test`), by the host C++ compiler against the CPU emulator
//!   (emu.h), so the kernels are tested without a GPU (`cfg(kernel_emu)`).

use std::path::{Path, PathBuf};
use std::process::Command;

const DIR: &str = "src/model/ops/cuda";

fn main() {
    println!("cargo::rerun-if-changed={DIR}");
    println!("cargo::rerun-if-env-changed=MAGICTAILOR_KERNEL_EMU");
    println!("cargo::rustc-check-cfg=cfg(kernel_emu)");
    let sources = kernel_sources();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        for cu in &sources {
            nvcc(cu, &out);
        }
    }
    let debug = std::env::var("PROFILE").is_ok_and(|p| p == "debug");
    if debug || std::env::var_os("MAGICTAILOR_KERNEL_EMU").is_some() {
        emulated(&sources, &out);
    }
}

fn kernel_sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(DIR)
        .expect("kernel folder")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    v
}

fn nvcc(cu: &Path, out: &Path) {
    let stem = cu.file_stem().and_then(|s| s.to_str()).expect("utf-8 name");
    let status = Command::new("nvcc")
        .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_80,code=compute_80"])
        .arg(cu)
        .arg("-o")
        .arg(out.join(format!("{stem}.fatbin")))
        .status()
        .expect("nvcc not found: put the CUDA toolkit's bin on PATH (scripts/cuda_toolchain.sh)");
    assert!(status.success(), "nvcc failed on {}", cu.display());
}

fn emulated(sources: &[PathBuf], out: &Path) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .opt_level(2)
        .include(DIR)
        .flag("-include")
        .flag(format!("{DIR}/emu.h"))
        .flag("-x")
        .flag("c++")
        .flag("-w")
        .cargo_metadata(false)
        .file(format!("{DIR}/emu.cpp"))
        .files(sources);
    b.compile("mt_kernels_emu");
    // Whole archive: the kernels register themselves from static constructors, which
    // the linker would drop as unreferenced.
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static:+whole-archive=mt_kernels_emu");
    println!("cargo::rustc-link-lib=dylib=stdc++");
    println!("cargo::rustc-cfg=kernel_emu");
}
