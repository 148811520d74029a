//! `magictailor doctor`: what this build and this machine can do, checked. The command a
//! user runs first, and pastes into a bug report (`--json`).
//!
//! - **Build**: version, commit, features, the GPU code compiled in and what ptxas said
//!   of each kernel;
//! - **Device**: the GPU (name, compute capability, memory, driver, runtime, the CUDA
//!   libraries as loaded) or the CPU (SIMD level of the kernels, threads, memory);
//! - **Kernels**: each kernel family's first-use check, then its time against candle's
//!   composed op on a U-Net-sized case;
//! - **Training estimate** (`--estimate`): seconds and peak memory of training steps at
//!   512 px on a random model of SD 2.1-base's shapes;
//! - **Hub**: the cache folder, offline mode, whether the default model is cached.
//!
//! Here: running the checks and the report; the facts come from `system`, the estimate
//! from `estimate`.
//!
//! May import anything in the library (it times `train`'s step); nothing but the CLI
//! imports it.

mod estimate;
mod system;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::error::Result;
use crate::kernels::{self, Comparison, Family, Verdict};
use crate::model::ops;

pub use estimate::Estimate;
pub use system::{BuildInfo, DeviceInfo, HubInfo};

/// What `doctor` checks.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Also time training steps on a random SD 2.1-base-shaped model (writes 5.2 GB into
    /// the temp folder once).
    pub estimate: bool,
}

/// One kernel family in one dtype: its first-use check and its timing.
#[derive(Debug, Clone)]
pub struct KernelRow {
    pub family: Family,
    pub dtype: DType,
    pub verdict: Verdict,
    /// The U-Net-sized case, where the check passed.
    pub timing: Option<std::result::Result<Comparison, String>>,
}

/// Everything `doctor` found.
#[derive(Debug)]
pub struct Report {
    pub build: BuildInfo,
    pub device: DeviceInfo,
    pub kernels: Vec<KernelRow>,
    pub estimate: Option<std::result::Result<Estimate, String>>,
    pub hub: HubInfo,
}

/// Runs every check `opts` asks for.
pub fn diagnose(opts: &DoctorOptions) -> Result<Report> {
    let build = system::build();
    let (device, dev) = system::device(&opts.device, &build)?;
    let kernels = kernel_rows(&dev);
    let estimate = opts.estimate.then(|| {
        let dtype = if dev.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        estimate::measure(&dev, dtype).map_err(|e| e.to_string())
    });
    Ok(Report {
        build,
        device,
        kernels,
        estimate,
        hub: system::hub(),
    })
}

/// The dtypes whose kernels `dev` runs: all three on a GPU, f32 on the CPU.
fn dtypes(dev: &Device) -> &'static [DType] {
    if dev.is_cuda() {
        &[DType::F32, DType::BF16, DType::F16]
    } else {
        &[DType::F32]
    }
}

fn kernel_rows(dev: &Device) -> Vec<KernelRow> {
    let mut rows = Vec::new();
    for family in Family::ALL {
        for &dtype in dtypes(dev) {
            if !kernels::kernels_exist(family, dev, dtype) {
                continue;
            }
            let verdict = ops::recheck(family, dev, dtype);
            let timing = verdict.is_on().then(|| {
                // Twice: the first pays for warm-up (allocations, the driver's JIT).
                let big = || ops::check_family(family, dev, dtype, true);
                big().and_then(|_| big()).map_err(|e| e.to_string())
            });
            rows.push(KernelRow {
                family,
                dtype,
                verdict,
                timing,
            });
        }
    }
    rows
}

impl Report {
    /// What failed, one line each; empty when everything checked passed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.device.problems.clone();
        for r in &self.kernels {
            let what = format!("{} kernels in {}", r.family.name(), r.dtype.as_str());
            match (&r.verdict, &r.timing) {
                (Verdict::Off(why), _) => p.push(format!("{what}: off, {why}")),
                (_, Some(Err(e))) => p.push(format!("{what}: the U-Net-sized case failed: {e}")),
                (_, Some(Ok(c))) if c.max_err > r.family.tolerance(r.dtype) => p.push(format!(
                    "{what}: the U-Net-sized case differs by {:.2e}",
                    c.max_err
                )),
                _ => {}
            }
        }
        if let Some(Err(e)) = &self.estimate {
            p.push(format!("training estimate: {e}"));
        }
        p
    }

    pub fn to_json(&self) -> Value {
        let kernels: Vec<Value> = self.kernels.iter().map(KernelRow::to_json).collect();
        let estimate = match &self.estimate {
            None => Value::Null,
            Some(Ok(e)) => e.to_json(),
            Some(Err(e)) => json!({ "error": e }),
        };
        json!({
            "build": self.build.to_json(),
            "device": self.device.to_json(),
            "kernels": kernels,
            "training_estimate": estimate,
            "hub": self.hub.to_json(),
            "problems": self.problems(),
            "ok": self.problems().is_empty(),
        })
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut section = |title: &str, lines: Vec<String>| {
            out.push_str(title);
            out.push('\n');
            for l in lines {
                out.push_str("  ");
                out.push_str(&l);
                out.push('\n');
            }
        };
        section("Build", self.build.lines());
        section("Device", self.device.lines());
        let mut k = vec![format!(
            "{:<11} {:<5} {:<34} {}",
            "family", "dtype", "first-use check", "U-Net-sized case: ours vs composed"
        )];
        k.extend(self.kernels.iter().map(KernelRow::line));
        if self.kernels.is_empty() {
            k = vec!["none for this device".into()];
        }
        section("Kernels", k);
        let estimate = match &self.estimate {
            None => vec![
                "skipped (--estimate: writes a 5.2 GB random model of SD 2.1-base's \
                          shapes into the temp folder once, then times training steps)"
                    .into(),
            ],
            Some(Ok(e)) => e.lines(),
            Some(Err(e)) => vec![format!("failed: {e}")],
        };
        section("Training estimate", estimate);
        section("Hub", self.hub.lines());
        let problems = self.problems();
        if problems.is_empty() {
            out.push_str("All checks passed.\n");
        } else {
            out.push_str(&format!("{} problem(s):\n", problems.len()));
            for p in problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

/// An f32 as the f64 its decimal form names (1e-4, not 9.99999974e-5).
fn f64_of(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

impl KernelRow {
    fn line(&self) -> String {
        let tol = self.family.tolerance(self.dtype);
        let check = match &self.verdict {
            Verdict::Passed { max_err, seconds } => {
                format!("ok {max_err:.1e} (<= {tol:.0e}), {:.0} ms", seconds * 1e3)
            }
            Verdict::Unchecked => "not checked (MAGICTAILOR_CUDA_KERNELS=1)".into(),
            Verdict::Off(why) => format!("OFF: {why}"),
        };
        let timing = match &self.timing {
            None => String::new(),
            Some(Ok(c)) => format!(
                "{:.2} ms vs {:.2} ms ({:.1}x)",
                c.kernel_seconds * 1e3,
                c.composed_seconds * 1e3,
                c.composed_seconds / c.kernel_seconds.max(1e-12)
            ),
            Some(Err(e)) => format!("failed: {e}"),
        };
        format!(
            "{:<11} {:<5} {:<34} {timing}",
            self.family.name(),
            self.dtype.as_str(),
            check
        )
    }

    fn to_json(&self) -> Value {
        let (state, max_err, check_seconds, why) = match &self.verdict {
            Verdict::Passed { max_err, seconds } => {
                ("checked", Some(f64_of(*max_err)), Some(*seconds), None)
            }
            Verdict::Unchecked => ("unchecked", None, None, None),
            Verdict::Off(why) => ("off", None, None, Some(why.clone())),
        };
        let timing = match &self.timing {
            None => Value::Null,
            Some(Ok(c)) => json!({
                "max_rel_err": f64_of(c.max_err),
                "kernel_seconds": c.kernel_seconds,
                "composed_seconds": c.composed_seconds,
            }),
            Some(Err(e)) => json!({ "error": e }),
        };
        json!({
            "family": self.family.name(),
            "dtype": self.dtype.as_str(),
            "state": state,
            "max_rel_err": max_err,
            "tolerance": f64_of(self.family.tolerance(self.dtype)),
            "check_seconds": check_seconds,
            "why": why,
            "unet_case": timing,
        })
    }
}
