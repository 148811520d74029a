//! `--device auto|cpu|cuda[:N]`.

use candle_core::Device;

use crate::error::{Error, Result};

/// What `--device` is unless told: a GPU when there is one, else the CPU.
pub const AUTO: &str = "auto";

pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_lowercase();
    let cuda = |n: usize| {
        if !candle_core::utils::cuda_is_available() {
            return Err(Error::usage(format!(
                "--device {spec}: this magictailor was built without CUDA. Rebuild with \
                 `cargo build --release --features cuda`, or use --device cpu."
            )));
        }
        Device::new_cuda(n).map_err(|e| {
            Error::usage(format!(
                "--device {spec}: cannot open CUDA device {n}: {}",
                crate::error::brief(&e)
            ))
        })
    };
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        AUTO => {
            if candle_core::utils::cuda_is_available() {
                cuda(0).or(Ok(Device::Cpu))
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(Error::usage(format!(
                "--device {spec}: expected auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// Process-wide CPU runtime settings; call first thing in `main`, before any tensor op.
///
/// candle's elementwise thread pool spins a worker for up to 25k iterations after each
/// job. On a small machine that worker competes with the GEMM threads for cores; parking
/// it at once measured ~8% faster training steps on 2 cores. An explicit
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is left alone.
pub fn tune_cpu_runtime() {
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        std::env::set_var(SPIN, "0");
    }
}

/// Resets the process's peak resident memory mark (Linux), so a later [`peak_rss`]
/// reports the peak since now.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory in bytes (Linux: `VmHWM`), if the system says.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
