//! The facts `doctor` reports: this build, the device (GPU or CPU), the hub cache.

use std::path::PathBuf;

use candle_core::Device;
use serde_json::{json, Value};

use crate::error::Result;
use crate::kernels::{self, KernelResources};

const GIB: f64 = (1u64 << 30) as f64;

// ---- Build ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub cuda: bool,
    /// The code our kernels' fatbins hold (CUDA builds).
    pub kernel_archs: Option<&'static str>,
    /// What candle's own CUDA kernels were compiled for (`CUDA_COMPUTE_CAP`).
    pub candle_cap: Option<&'static str>,
    /// ptxas's report of each of our kernels.
    pub kernels: Vec<KernelResources>,
}

pub fn build() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("MAGICTAILOR_COMMIT"),
        cuda: cfg!(feature = "cuda"),
        kernel_archs: option_env!("MAGICTAILOR_KERNEL_ARCHS"),
        candle_cap: option_env!("MAGICTAILOR_CANDLE_CAP"),
        kernels: kernels::compiled_kernels(),
    }
}

impl BuildInfo {
    pub fn lines(&self) -> Vec<String> {
        let mut l = vec![format!(
            "magictailor {} (commit {})",
            self.version, self.commit
        )];
        if !self.cuda {
            l.push(
                "features: none: CPU only (`cargo build --release --features cuda` for GPUs)"
                    .into(),
            );
            return l;
        }
        l.push("features: cuda".into());
        let spills: Vec<String> = (self.kernels.iter())
            .filter(|k| k.spill_stores + k.spill_loads > 0)
            .map(|k| format!("{} (sm_{}, {} B)", k.kernel, k.arch, k.spill_stores))
            .collect();
        let regs = self.kernels.iter().map(|k| k.registers);
        let (lo, hi) = (regs.clone().min().unwrap_or(0), regs.max().unwrap_or(0));
        l.push(format!(
            "our CUDA kernels: {} ({}); {lo}-{hi} registers per thread; spilling: {}",
            (self.kernels.iter().map(|k| &k.kernel))
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            self.kernel_archs.unwrap_or("?"),
            if spills.is_empty() {
                "none".into()
            } else {
                spills.join(", ")
            }
        ));
        l.push(format!(
            "candle's CUDA kernels: compute capability {}",
            self.candle_cap.unwrap_or("?")
        ));
        l
    }

    pub fn to_json(&self) -> Value {
        let kernels: Vec<Value> = (self.kernels.iter())
            .map(|k| {
                json!({
                    "kernel": k.kernel, "arch": format!("sm_{}", k.arch), "launch_bound": k.bound,
                    "registers": k.registers, "static_shared": k.static_shared,
                    "stack": k.stack, "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                })
            })
            .collect();
        json!({
            "version": self.version,
            "commit": self.commit,
            "features": if self.cuda { vec!["cuda"] } else { vec![] },
            "kernel_archs": self.kernel_archs,
            "candle_compute_cap": self.candle_cap,
            "kernels": kernels,
        })
    }
}

// ---- Device --------------------------------------------------------------------------

#[derive(Debug)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`: where the kernels below were checked.
    pub name: String,
    /// Facts, as `(what, value)`.
    pub facts: Vec<(String, String)>,
    /// Why no GPU was used, where none was.
    pub no_gpu: Option<String>,
    pub problems: Vec<String>,
}

impl DeviceInfo {
    pub fn lines(&self) -> Vec<String> {
        let mut l: Vec<String> = self.no_gpu.iter().cloned().collect();
        l.extend(self.facts.iter().map(|(k, v)| format!("{k}: {v}")));
        l
    }

    pub fn to_json(&self) -> Value {
        let facts: serde_json::Map<String, Value> = (self.facts.iter())
            .map(|(k, v)| (k.replace(' ', "_"), Value::from(v.clone())))
            .collect();
        json!({ "name": self.name, "no_gpu": self.no_gpu, "facts": facts })
    }
}

/// The device `spec` names, and what it is. Without a GPU (none, or a CPU-only build)
/// the CPU is checked instead, and `no_gpu` says why in one line; a GPU asked for by name
/// that cannot be opened is also a problem.
pub fn device(spec: &str, build: &BuildInfo) -> Result<(DeviceInfo, Device)> {
    let spec = spec.trim().to_lowercase();
    let wants_gpu = spec != "cpu";
    let (dev, no_gpu) = match (wants_gpu, crate::device::parse(&spec)) {
        (false, _) => (Device::Cpu, None),
        (true, Ok(d)) if d.is_cuda() => (d, None),
        (true, Ok(d)) => (d, Some(gpu_absent(build))),
        (true, Err(e)) if spec == "auto" => (Device::Cpu, Some(format!("no GPU: {e}"))),
        (true, Err(e)) => {
            let mut info = cpu_info();
            info.no_gpu = Some(format!("no GPU: {e}"));
            info.problems.push(e.to_string());
            return Ok((info, Device::Cpu));
        }
    };
    let mut info = match &dev {
        Device::Cuda(_) => gpu_info(&dev, build),
        _ => cpu_info(),
    };
    info.no_gpu = no_gpu;
    Ok((info, dev))
}

fn gpu_absent(build: &BuildInfo) -> String {
    if build.cuda {
        "no GPU: CUDA finds no device; the CPU is checked instead".into()
    } else {
        "no GPU support in this build (--features cuda); the CPU is checked instead".into()
    }
}

fn cpu_info() -> DeviceInfo {
    let mut facts = vec![
        ("cpu".into(), std::env::consts::ARCH.to_string()),
        ("kernels".into(), kernels::simd_level().to_string()),
        (
            "threads".into(),
            candle_core::utils::get_num_threads().to_string(),
        ),
    ];
    if let Some((total, available)) = host_memory() {
        facts.push((
            "memory".into(),
            format!(
                "{:.1} GiB, {:.1} GiB available",
                total / GIB,
                available / GIB
            ),
        ));
    }
    DeviceInfo {
        name: "cpu".into(),
        facts,
        no_gpu: None,
        problems: Vec::new(),
    }
}

/// Total and available host memory in bytes (Linux).
fn host_memory() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
    };
    Some((kb("MemTotal:")?, kb("MemAvailable:")?))
}

/// The CUDA libraries this process loaded, and from where.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let wanted = [
        "libcuda.so",
        "libcudart",
        "libcublas",
        "libcurand",
        "libnvrtc",
    ];
    let mut libs: Vec<String> = (maps.lines())
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            wanted
                .iter()
                .any(|w| p.rsplit('/').next().unwrap_or("").starts_with(w))
        })
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

#[cfg(feature = "cuda")]
fn gpu_info(dev: &Device, build: &BuildInfo) -> DeviceInfo {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = dev else {
        return cpu_info();
    };
    let ctx = d.cuda_stream().context().clone();
    let mut facts = Vec::new();
    let mut problems = Vec::new();
    let name = ctx.name().unwrap_or_else(|e| format!("? ({e})"));
    let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
    facts.push((
        "gpu".into(),
        format!("{name}, compute capability {major}.{minor}"),
    ));
    if let Ok((free, total)) = ctx.mem_get_info() {
        let (free, total) = (free as f64 / GIB, total as f64 / GIB);
        facts.push((
            "memory".into(),
            format!("{total:.1} GiB, {free:.1} GiB free"),
        ));
    }
    let mut driver = 0;
    // SAFETY: cuDriverGetVersion writes one int.
    let driver_ok = unsafe { sys::cuDriverGetVersion(&mut driver) } == sys::CUresult::CUDA_SUCCESS;
    let mut runtime = 0;
    // SAFETY: cudaRuntimeGetVersion writes one int.
    let runtime_ok = unsafe { cudaRuntimeGetVersion(&mut runtime) } == 0;
    let version = |ok: bool, v: i32| {
        if ok {
            format!("{}.{}", v / 1000, v % 1000 / 10)
        } else {
            "?".into()
        }
    };
    facts.push((
        "cuda".into(),
        format!(
            "driver {}, runtime {}",
            version(driver_ok, driver),
            version(runtime_ok, runtime)
        ),
    ));
    for lib in loaded_libraries() {
        facts.push(("library".into(), lib));
    }
    facts.push((
        "shared memory per block".into(),
        format!("{} KiB", kernels::gpu_shared_limit(dev) / 1024),
    ));
    if major < 8 {
        problems.push(format!(
            "compute capability {major}.{minor}: our kernels need 8.0 or newer, so candle's \
             composed ops run (slower); bf16 is unavailable"
        ));
    }
    if let Some(cap) = build.candle_cap.and_then(|c| c.parse::<i32>().ok()) {
        let cc = major * 10 + minor;
        if cc < cap || (cap == 90 && cc != 90) {
            problems.push(format!(
                "candle's kernels were built for compute capability {}.{} and cannot run on \
                 this {major}.{minor} GPU: rebuild with CUDA_COMPUTE_CAP={cc} cargo build \
                 --release --features cuda",
                cap / 10,
                cap % 10
            ));
        }
    }
    DeviceInfo {
        name: format!("cuda:{}", ctx.ordinal()),
        facts,
        no_gpu: None,
        problems,
    }
}

#[cfg(feature = "cuda")]
extern "C" {
    // libcudart, linked by candle.
    fn cudaRuntimeGetVersion(version: *mut i32) -> i32;
}

#[cfg(not(feature = "cuda"))]
fn gpu_info(_: &Device, _: &BuildInfo) -> DeviceInfo {
    cpu_info()
}

// ---- Hub -----------------------------------------------------------------------------

#[derive(Debug)]
pub struct HubInfo {
    pub cache: PathBuf,
    /// Which environment variable set the cache folder, or that it is the default.
    pub source: String,
    /// `HF_ENDPOINT`'s mirror, or the hub.
    pub endpoint: String,
    /// Where the token comes from (never the token itself), if any.
    pub token_from: Option<String>,
    pub offline: bool,
    /// The default model's snapshot folder, where it is complete in the cache.
    pub default_model: std::result::Result<PathBuf, String>,
    pub notes: Vec<String>,
}

pub fn hub() -> HubInfo {
    use crate::model::loader::{cached_snapshot, DEFAULT_MODEL};
    let env = crate::model::hub_env::HubEnv::from_env();
    let (cache, source) = (env.cache.clone(), env.cache_from.clone());
    let mut notes = Vec::new();
    let offline = env.offline;
    let default_model = cached_snapshot(DEFAULT_MODEL);
    if let Err(why) = &default_model {
        notes.push(if offline {
            format!("{DEFAULT_MODEL} is {why} and HF_HUB_OFFLINE is set: pass --model DIR")
        } else {
            format!("{DEFAULT_MODEL} is {why}: the first train or infer downloads it (5 GB)")
        });
    }
    HubInfo {
        cache,
        source,
        endpoint: env.endpoint,
        token_from: env.token_from,
        offline,
        default_model,
        notes,
    }
}

impl HubInfo {
    pub fn lines(&self) -> Vec<String> {
        use crate::model::loader::DEFAULT_MODEL;
        let mut l = vec![
            format!("cache: {} ({})", self.cache.display(), self.source),
            format!(
                "offline: {}",
                if self.offline {
                    "yes (HF_HUB_OFFLINE)"
                } else {
                    "no"
                }
            ),
            format!("endpoint: {}", self.endpoint),
            format!(
                "token: {}",
                self.token_from
                    .as_deref()
                    .map_or("none".to_string(), |f| format!("from {f}"))
            ),
        ];
        if let Ok(p) = &self.default_model {
            l.push(format!("{DEFAULT_MODEL}: cached at {}", p.display()));
        }
        l.extend(self.notes.iter().cloned());
        l
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cache": self.cache,
            "cache_source": self.source,
            "endpoint": self.endpoint,
            "token_from": self.token_from,
            "offline": self.offline,
            "default_model": crate::model::loader::DEFAULT_MODEL,
            "default_model_cached": self.default_model.as_ref().ok(),
            "default_model_missing": self.default_model.as_ref().err(),
            "notes": self.notes,
        })
    }
}
