//! `doctor --estimate`: seconds and peak memory of MagicTailor training steps at 512 px
//! (3+3 images, warm-up and DS-Bal) on a random model of SD 2.1-base's shapes, taken by
//! the trainer `train` runs. Random weights: the speed and memory of the real model,
//! nothing about its images.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::error::Result;
use crate::io::progress::Progress;
use crate::model::tiny;
use crate::train::trainer::Trainer;
use crate::train::TrainConfig;

const RESOLUTION: usize = 512;

#[derive(Debug, Clone)]
pub struct Estimate {
    pub resolution: usize,
    pub dtype: DType,
    /// Seconds of the second warm-up step and of the second DS-Bal step (the first of
    /// each pays for warm-up and the phase switch).
    pub warmup_seconds: f64,
    pub dsbal_seconds: f64,
    /// The peak, and what was measured.
    pub peak_bytes: Option<u64>,
    pub peak_of: &'static str,
    pub model: PathBuf,
}

/// Trains 2 + 2 steps on `dev` in `dtype` and times the second of each phase.
pub fn measure(dev: &Device, dtype: DType) -> Result<Estimate> {
    let root = std::env::temp_dir().join("magictailor-doctor");
    let model_dir = root.join("sd21-base-shapes");
    if !model_dir.join("model_index.json").is_file() {
        crate::io::console::note(format_args!(
            "doctor: writing a random model of SD 2.1-base's shapes (5.2 GB) into {} (once)",
            model_dir.display()
        ));
    }
    let model = tiny::ensure_sd21_shapes(&model_dir)?;
    measure_on(&model, &root, dev, dtype, RESOLUTION)
}

/// [`measure`] on `model` at `resolution`, the pair written into `root`.
fn measure_on(
    model: &std::path::Path,
    root: &std::path::Path,
    dev: &Device,
    dtype: DType,
    resolution: usize,
) -> Result<Estimate> {
    let pair = crate::data::synthetic::write_pair(root)?;
    let mut cfg = TrainConfig::new(pair, root.join("output"), model.to_string_lossy().into());
    (cfg.warmup_steps, cfg.dsbal_steps, cfg.resolution) = (2, 2, resolution);
    (cfg.dtype, cfg.loss_scale) = (dtype, TrainConfig::default_loss_scale(dtype));
    let mut t = Trainer::new(cfg, dev, Progress::Quiet)?;
    let meter = PeakMeter::start(dev);
    let mut seconds = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        t.train_step()?;
        dev.synchronize()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    let (peak_bytes, peak_of) = meter.stop();
    Ok(Estimate {
        resolution,
        dtype,
        warmup_seconds: seconds[1],
        dsbal_seconds: seconds[3],
        peak_bytes,
        peak_of,
        model: model.to_path_buf(),
    })
}

impl Estimate {
    pub fn lines(&self) -> Vec<String> {
        let peak = self
            .peak_bytes
            .map_or("?".into(), |b| format!("{:.1} GB", b as f64 / 1e9));
        vec![
            format!(
                "3+3 images at {} px in {}, random weights of SD 2.1-base's shapes",
                self.resolution,
                self.dtype.as_str()
            ),
            format!(
                "{:.2} s per warm-up step, {:.2} s per DS-Bal step; peak {peak} ({})",
                self.warmup_seconds, self.dsbal_seconds, self.peak_of
            ),
        ]
    }

    pub fn to_json(&self) -> Value {
        json!({
            "resolution": self.resolution,
            "images": 6,
            "dtype": self.dtype.as_str(),
            "warmup_step_seconds": self.warmup_seconds,
            "dsbal_step_seconds": self.dsbal_seconds,
            "peak_bytes": self.peak_bytes,
            "peak_of": self.peak_of,
            "model": self.model,
        })
    }
}

/// The peak memory while training: the process's resident memory on the CPU; on a GPU
/// the device's memory in use, sampled every 5 ms (candle keeps no allocator statistics).
enum PeakMeter {
    Host,
    #[cfg(feature = "cuda")]
    Gpu {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        sampler: std::thread::JoinHandle<u64>,
    },
}

impl PeakMeter {
    fn start(dev: &Device) -> PeakMeter {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                use std::sync::atomic::{AtomicBool, Ordering};
                let ctx = d.cuda_stream().context().clone();
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let sampler = std::thread::spawn(move || {
                    let mut peak = 0u64;
                    while !flag.load(Ordering::Relaxed) {
                        if let Ok((free, total)) = ctx.mem_get_info() {
                            peak = peak.max(total.saturating_sub(free) as u64);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    peak
                });
                PeakMeter::Gpu { stop, sampler }
            }
            _ => {
                crate::device::reset_peak_rss();
                PeakMeter::Host
            }
        }
    }

    fn stop(self) -> (Option<u64>, &'static str) {
        match self {
            PeakMeter::Host => (crate::device::peak_rss(), "resident memory"),
            #[cfg(feature = "cuda")]
            PeakMeter::Gpu { stop, sampler } => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let peak = sampler.join().ok();
                (peak, "GPU memory in use, sampled every 5 ms")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate's steps, timer and memory meter, on the tiny model at 64 px.
    #[test]
    fn training_steps_are_timed_with_their_peak_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tiny::ensure_cached().unwrap();
        let e = measure_on(&model, tmp.path(), &Device::Cpu, DType::F32, 64).unwrap();
        assert!(e.warmup_seconds > 0.0 && e.dsbal_seconds > 0.0, "{e:?}");
        assert!(e.peak_bytes.is_some_and(|b| b > 1 << 20), "{e:?}");
        assert!(
            e.lines()[1].contains("s per DS-Bal step"),
            "{:?}",
            e.lines()
        );
        assert_eq!(e.to_json()["resolution"], 64);
    }
}
