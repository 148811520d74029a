//! Step-1 gradients and the trained tensors of a short run, for comparing backends,
//! precisions or code paths directly (docs/candle.md §7: CUDA and CPU LoRA weights
//! differ after 8 steps while the losses agree).
//!
//! ```text
//! cargo run --release --example step_grads -- run --device cpu --out cpu.safetensors
//! cargo run --release --features cuda --example step_grads -- run --device cuda --out cuda.safetensors
//! cargo run --release --example step_grads -- compare cpu.safetensors cuda.safetensors
//! ```
//!
//! `run` trains `--steps` warm-up steps from a fixed seed and writes `grad.<name>` (the
//! unclipped gradients of step 1), `final.<name>` (the trainable tensors after the last
//! step) and `loss` (per step). Without `--pair` it trains on a small synthetic pair.
//! `compare A B` prints, per tensor, `||a-b||/||a||`, `max|a-b|/max|a|` and, for
//! gradients, the fraction of entries whose sign differs and the largest of those
//! entries relative to the tensor's largest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use magictailor::io::progress::Progress;
use magictailor::testkit::pairs::{pair_folder, PairSpec};
use magictailor::train::trainer::Trainer;
use magictailor::train::TrainConfig;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a few steps; write step-1 gradients, final tensors and losses.
    Run(RunArgs),
    /// Per-tensor relative differences between two `run` outputs (A is the reference).
    Compare { a: PathBuf, b: PathBuf },
}

#[derive(Parser)]
struct RunArgs {
    #[arg(long, default_value = "tiny-random")]
    model: String,
    /// A pair folder; default: a synthetic 2 + 2 image pair, written to a temp folder.
    #[arg(long)]
    pair: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    #[arg(long, default_value_t = 8)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    resolution: usize,
    /// The paper's rank (alpha = rank).
    #[arg(long, default_value_t = 32)]
    lora_rank: usize,
    /// Attention as the plain composition (softmax of the full scores), not the fused op.
    #[arg(long)]
    reference_attention: bool,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    /// Every model op in f64, so through the composed ops CUDA runs (the fused CPU
    /// kernels are f32 only); the trainable tensors stay f32.
    F64,
    Bf16,
    F16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

fn main() -> Result<()> {
    magictailor::device::tune_cpu_runtime();
    match Cli::parse().command {
        Command::Run(a) => run(a),
        Command::Compare { a, b } => compare(&a, &b),
    }
}

fn run(a: RunArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("step-grads-{}", std::process::id()));
    let pair = match &a.pair {
        Some(p) => p.clone(),
        None => pair_folder(&tmp, &PairSpec::training()),
    };
    magictailor::model::ops::use_reference_attention(a.reference_attention);
    let device = magictailor::device::parse(&a.device)?;
    let mut trainer = Trainer::new(config(&a, pair, &tmp), &device, Progress::Quiet)?;
    let mut out: HashMap<String, Tensor> = prefixed("grad", trainer.next_gradients()?);
    let mut losses = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        losses.push(trainer.train_step()?.loss);
    }
    let trained = trainer.trainable().into_iter();
    out.extend(trained.map(|(name, v)| (format!("final.{name}"), v.as_detached_tensor())));
    out.insert("loss".into(), Tensor::new(losses.as_slice(), &Device::Cpu)?);
    magictailor::io::tensors::write(&a.out, &out, None)?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("losses {losses:?}\nwrote {}", a.out.display());
    Ok(())
}

/// Warm-up only, the paper's other settings, at a small size.
fn config(a: &RunArgs, pair: PathBuf, tmp: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::new(pair, tmp.join("out"), a.model.clone());
    (cfg.warmup_steps, cfg.dsbal_steps) = (a.steps, 0);
    (cfg.seed, cfg.resolution, cfg.dtype) = (a.seed, a.resolution, a.dtype.dtype());
    (cfg.lora_rank, cfg.lora_alpha) = (a.lora_rank, a.lora_rank as f64);
    cfg.loss_scale = TrainConfig::default_loss_scale(cfg.dtype);
    cfg
}

fn prefixed(prefix: &str, t: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    t.into_iter()
        .map(|(k, v)| (format!("{prefix}.{k}"), v))
        .collect()
}

fn compare(a: &Path, b: &Path) -> Result<()> {
    let load = |p: &Path| {
        candle_core::safetensors::load(p, &Device::Cpu).map_err(|e| format!("{}: {e}", p.display()))
    };
    let (a, b) = (load(a)?, load(b)?);
    let mut worst: Vec<_> = table(&a, &b)?.into_iter().collect();
    worst.sort_by_key(|(kind, _)| kind.clone());
    for (kind, w) in worst {
        println!("worst max_rel over {kind}.*: {w:.3e}");
    }
    if let (Some(la), Some(lb)) = (a.get("loss"), b.get("loss")) {
        let d = Diff::of(&vec64(la)?, &vec64(lb)?);
        println!("losses: max_rel {:.3e}", d.max_rel);
    }
    Ok(())
}

type Tensors = HashMap<String, Tensor>;

/// Prints one row per tensor of `a`; returns the worst max_rel per prefix (grad, final).
fn table(a: &Tensors, b: &Tensors) -> Result<HashMap<String, f64>> {
    let mut names: Vec<&String> = a.keys().filter(|k| *k != "loss").collect();
    names.sort();
    let head = ["max|a|", "rel_l2", "max_rel", "flips", "flip_max"];
    println!(
        "{:<70} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "tensor", head[0], head[1], head[2], head[3], head[4]
    );
    let mut worst: HashMap<String, f64> = HashMap::new();
    for name in names {
        let other = b.get(name).ok_or(format!("{name} missing from B"))?;
        let d = Diff::of(&vec64(&a[name])?, &vec64(other)?);
        let kind = name.split('.').next().unwrap_or_default().to_string();
        let w = worst.entry(kind).or_default();
        *w = w.max(d.max_rel);
        println!(
            "{name:<70} {:>9.2e} {:>9.2e} {:>9.2e} {:>7.4} {:>9.2e}",
            d.a_max, d.rel_l2, d.max_rel, d.flips, d.flip_max
        );
    }
    Ok(worst)
}

fn vec64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// How far B is from A, relative to A's scale.
struct Diff {
    a_max: f64,
    rel_l2: f64,
    max_rel: f64,
    /// Fraction of entries where A and B have opposite signs.
    flips: f64,
    /// The largest |a| among those entries, over max |a|: small when only entries at
    /// rounding-noise level flip.
    flip_max: f64,
}

impl Diff {
    fn of(a: &[f64], b: &[f64]) -> Self {
        let max = |it: &mut dyn Iterator<Item = f64>| it.fold(0f64, f64::max);
        let norm = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
        let pairs = || a.iter().zip(b);
        let a_max = max(&mut a.iter().map(|x| x.abs()));
        let flipped: Vec<f64> = pairs()
            .filter(|(x, y)| *x * *y < 0.0)
            .map(|(x, _)| x.abs())
            .collect();
        // 0/0 (e.g. a gradient that is zero on both sides) reads as no difference.
        let ratio = |n: f64, d: f64| if n == 0.0 { 0.0 } else { n / d };
        Self {
            a_max,
            rel_l2: ratio(
                norm(&mut pairs().map(|(x, y)| x - y)),
                norm(&mut a.iter().copied()),
            ),
            max_rel: ratio(max(&mut pairs().map(|(x, y)| (x - y).abs())), a_max),
            flips: flipped.len() as f64 / a.len().max(1) as f64,
            flip_max: ratio(max(&mut flipped.into_iter()), a_max),
        }
    }
}
