//! `--device auto|cpu|cuda[:N]`.

use candle_core::Device;

use crate::error::{Error, Result};

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
        "auto" => {
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
