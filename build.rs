//! Compiles the CUDA kernels in src/kernels/cuda/:
//! - with `--features cuda`, by nvcc into fatbins holding sm_80 SASS (every 8.x GPU: A100,
//!   RTX 30xx/40xx, L4), sm_90 SASS (H100/H200) and compute_80 PTX (newer GPUs JIT-compile
//!   it). ptxas's report of each kernel's registers, shared memory and spills is checked
//!   against the launch rules (a kernel that cannot launch at its `__launch_bounds__` fails
//!   the build), kept in OUT_DIR for `magictailor doctor`, and compared with the committed
//!   copy the emulator reads (cuda/resources.tsv; `MAGICTAILOR_KERNEL_TABLE=write` updates
//!   it, `=check` makes a difference an error, as CI does);
//! - with the `testkit` feature (on for tests, benches and examples, never in the shipped
//!   binary), by the host C++ compiler against the CPU emulator (emu.h), so the kernels are
//!   tested without a GPU (`cfg(feature = "testkit")`).
//!
//! Both are skipped when the kernel folder's bytes are those of the last build (the
//! script also reruns for a new git commit, which `magictailor doctor` reports).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/kernels/cuda/limits.rs"]
#[allow(dead_code)]
mod limits;

use limits::Resources;

const DIR: &str = "src/kernels/cuda";
const TABLE: &str = "src/kernels/cuda/resources.tsv";

fn main() {
    println!("cargo::rerun-if-changed={DIR}");
    println!("cargo::rerun-if-env-changed=MAGICTAILOR_KERNEL_TABLE");
    let sources = kernel_sources();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    commit();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let report = out.join("kernel_resources.tsv");
        let tag = folder_hash("nvcc");
        if !is_current(&out, "nvcc", tag, &report) {
            let rows: Vec<Resources> = sources.iter().flat_map(|cu| nvcc(cu, &out)).collect();
            write_report(rows, &report);
            mark_current(&out, "nvcc", tag);
        }
        check_report(&report);
        println!("cargo::rustc-env=MAGICTAILOR_KERNEL_ARCHS={ARCHS}");
        // What candle's own kernels were compiled for (its build reads the same variable,
        // or asks nvidia-smi).
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "this machine's GPU".into());
        println!("cargo::rustc-env=MAGICTAILOR_CANDLE_CAP={cap}");
    }
    if std::env::var_os("CARGO_FEATURE_TESTKIT").is_some() {
        let lib = out.join("libmt_kernels_emu.a");
        let tag = folder_hash("emu");
        if !is_current(&out, "emu", tag, &lib) {
            emulated(&sources);
            mark_current(&out, "emu", tag);
        }
        // Whole archive: the kernels register themselves from static constructors, which
        // the linker would drop as unreferenced.
        println!("cargo::rustc-link-search=native={}", out.display());
        println!("cargo::rustc-link-lib=static:+whole-archive=mt_kernels_emu");
        println!("cargo::rustc-link-lib=dylib=stdc++");
    }
}

/// The code the fatbins hold, as `doctor` reports it.
const ARCHS: &str = "sm_80 sm_90 SASS, compute_80 PTX";

/// A hash of every file in the kernel folder, and of `what` is built from it.
fn folder_hash(what: &str) -> u64 {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .expect("kernel folder")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_file() && !p.ends_with("resources.tsv"))
        .collect();
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (what, ARCHS, std::env::var("CXX").ok()).hash(&mut h);
    for f in files {
        (
            f.file_name(),
            std::fs::read(&f).expect("read a kernel source"),
        )
            .hash(&mut h);
    }
    h.finish()
}

fn is_current(out: &Path, what: &str, tag: u64, product: &Path) -> bool {
    let stamp = std::fs::read_to_string(out.join(format!("{what}.stamp")));
    product.is_file() && stamp.is_ok_and(|s| s.trim() == tag.to_string())
}

fn mark_current(out: &Path, what: &str, tag: u64) {
    std::fs::write(out.join(format!("{what}.stamp")), tag.to_string()).expect("write a stamp");
}

/// `MAGICTAILOR_COMMIT`: the commit being built (`unknown` outside a git checkout).
fn commit() {
    let git = |args: &[&str]| -> Option<String> {
        let o = Command::new("git").args(args).output().ok()?;
        let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
        (o.status.success() && !s.is_empty()).then_some(s)
    };
    let hash = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-env=MAGICTAILOR_COMMIT={hash}");
    // Rerun on a new commit or branch: HEAD, the branch it names, packed refs.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for w in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &w]) {
            println!("cargo::rerun-if-changed={p}");
        }
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

/// Compiles `cu` to OUT_DIR/{stem}.fatbin; returns ptxas's report of its kernels.
fn nvcc(cu: &Path, out: &Path) -> Vec<Resources> {
    let stem = cu.file_stem().and_then(|s| s.to_str()).expect("utf-8 name");
    let keep = out.join(format!("nvcc-{stem}"));
    std::fs::create_dir_all(&keep).expect("nvcc keep folder");
    let output = Command::new("nvcc")
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "--resource-usage",
        ])
        .args(["-gencode", "arch=compute_80,code=[sm_80,compute_80]"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .arg("--keep")
        .arg("--keep-dir")
        .arg(&keep)
        .arg(cu)
        .arg("-o")
        .arg(out.join(format!("{stem}.fatbin")))
        .output()
        .expect("nvcc not found: put the CUDA toolkit's bin on PATH (scripts/cuda_toolchain.sh)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "nvcc failed on {}:\n{text}",
        cu.display()
    );
    let ptx = std::fs::read_to_string(keep.join(format!("{stem}.compute_80.ptx")))
        .expect("nvcc --keep wrote no compute_80 PTX");
    ptxas_report(&text, &ptx)
}

/// Each kernel's resources from ptxas's `--resource-usage` lines, with its launch bound
/// from the PTX (`.maxntid`).
fn ptxas_report(text: &str, ptx: &str) -> Vec<Resources> {
    let bounds = ptx_bounds(ptx);
    let mut rows: Vec<Resources> = Vec::new();
    let num_before = |line: &str, unit: &str| -> u32 {
        let Some(end) = line.find(unit) else { return 0 };
        let digits = line[..end]
            .trim_end()
            .rsplit([' ', ','])
            .next()
            .unwrap_or("");
        digits.parse().unwrap_or(0)
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest
                .rsplit("'sm_")
                .next()
                .unwrap_or("")
                .trim_end_matches('\'');
            rows.push(Resources {
                bound: bounds.iter().find(|(k, _)| *k == kernel).map_or(0, |b| b.1),
                kernel,
                arch: arch.parse().unwrap_or(0),
                registers: 0,
                static_shared: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(r) = rows.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains(" registers") {
                r.registers = num_before(line, "registers");
                r.static_shared = num_before(line, "bytes smem");
            }
        }
    }
    rows
}

/// `(kernel, .maxntid)` of every entry in a PTX file.
fn ptx_bounds(ptx: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut entry = None;
    for line in ptx.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix(".visible .entry ") {
            entry = Some(rest.split('(').next().unwrap_or("").to_string());
        } else if let (Some(rest), Some(k)) = (line.strip_prefix(".maxntid "), &entry) {
            let n = rest
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .parse()
                .unwrap_or(0);
            out.push((k.clone(), n));
        }
    }
    out
}

/// Fails the build on a kernel that cannot launch as built, warns of spills, and writes
/// the report to `file`.
fn write_report(mut rows: Vec<Resources>, file: &Path) {
    rows.sort_by(|a, b| (&a.kernel, a.arch).cmp(&(&b.kernel, b.arch)));
    let problems: Vec<String> = rows.iter().flat_map(Resources::problems).collect();
    assert!(
        problems.is_empty(),
        "CUDA kernels that cannot launch:\n{}",
        problems.join("\n")
    );
    let lines: Vec<String> = rows.iter().map(Resources::line).collect();
    let table = format!(
        "# ptxas's report of every kernel (build.rs writes it; the emulator reads it)\n{}\n{}\n",
        limits::HEADER,
        lines.join("\n")
    );
    std::fs::write(file, &table).expect("write the kernel report");
}

/// Prints a summary of the report at `file` (one line), and compares it with the
/// committed table.
fn check_report(file: &Path) {
    let table = std::fs::read_to_string(file).expect("read the kernel report");
    let report = limits::parse_table(&table);
    let spills: Vec<String> = (report.iter())
        .filter(|r| r.spill_stores + r.spill_loads > 0)
        .map(|r| format!("{} sm_{} {} B", r.kernel, r.arch, r.spill_stores))
        .collect();
    let regs = report.iter().map(|r| r.registers);
    let shared = report.iter().map(|r| r.static_shared).max().unwrap_or(0);
    println!(
        "cargo::warning=CUDA kernels: {} x ({ARCHS}), {}-{} registers per thread, at most {shared} \
         B of static shared memory, spilling: {}; report in {}",
        report.iter().map(|r| &r.kernel).collect::<std::collections::BTreeSet<_>>().len(),
        regs.clone().min().unwrap_or(0),
        regs.max().unwrap_or(0),
        if spills.is_empty() { "none".into() } else { spills.join(", ") },
        file.display()
    );
    let committed = std::fs::read_to_string(TABLE).unwrap_or_default();
    if limits::parse_table(&committed) == report {
        return;
    }
    match std::env::var("MAGICTAILOR_KERNEL_TABLE").as_deref() {
        Ok("write") => std::fs::write(TABLE, &table).expect("write resources.tsv"),
        Ok("check") => panic!(
            "{TABLE} is not what this build's ptxas reports. Rebuild with \
             MAGICTAILOR_KERNEL_TABLE=write to update it; the report:\n{table}"
        ),
        _ => println!(
            "cargo::warning={TABLE} differs from this build's ptxas report (another nvcc, or \
             changed kernels): MAGICTAILOR_KERNEL_TABLE=write updates it"
        ),
    }
}

fn emulated(sources: &[PathBuf]) {
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
}
