//! `cargo bench`: seconds per MagicTailor training step (warm-up and DS-Bal, 3+3 images),
//! per U-Net forward+backward with LoRA (rank 32 at the MagicTailor targets, batch 6) and
//! per DDIM step (CFG, batch 2), for the tiny and a mid-size config, with each row's peak
//! resident memory; and the mid step with naive attention, for the memory it costs.
//!
//! After its timed repetitions each row runs once more with profiling on and prints
//! where that repetition's time went (`magictailor::profile`); the timings themselves
//! are unprofiled unless `MAGICTAILOR_PROFILE=1` is set (which measures its overhead).
//!
//! Speed is reported, never asserted. `scripts/bench_pytorch.py` runs the same rows in
//! PyTorch on the models kept by `MAGICTAILOR_BENCH_DIR`; numbers in benches/README.md.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::TrainableLora;
use magictailor::model::nn::Ctx;
use magictailor::model::scheduler::Ddim;
use magictailor::profile;
use magictailor::rng::seeded_normal;

/// Resets the process's peak-RSS mark (Linux), so each row reports its own peak.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f(); // warm-up
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Runs `f` once more with profiling on and prints the table.
fn profile_once(mut f: impl FnMut()) {
    let was = profile::enabled();
    profile::enable();
    if let Some(run) = profile::Run::start() {
        f();
        print!("{}", run.finish().table());
    }
    profile::set_enabled(was);
}

fn bench(name: &str, dir: &std::path::Path, latent: usize, reps: usize) {
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &dev, DType::F32).expect("model");
    let hidden = sd.text_encoder.config.hidden_size;
    let lora = TrainableLora::new(&sd.unet.lora_targets(), 32, 32.0, 0, &dev, DType::F32).unwrap();
    let ctx6 = seeded_normal(1, (6, 77, hidden), &dev).unwrap();
    let x6 = seeded_normal(2, (6, 4, latent, latent), &dev).unwrap();
    let t6 = Tensor::new(&[10f32, 200., 400., 600., 800., 990.], &dev).unwrap();
    let mut train_once = || {
        let set = lora.as_set();
        let out = sd
            .unet
            .forward(
                &x6,
                &t6,
                &ctx6,
                Ctx {
                    lora: Some(&set),
                    probe: None,
                },
            )
            .unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(lora.modules[0].a.as_tensor()).is_some());
    };
    let train = time(reps, &mut train_once);

    let ctx2 = seeded_normal(3, (2, 77, hidden), &dev).unwrap();
    let x1 = seeded_normal(4, (1, 4, latent, latent), &dev).unwrap();
    let ddim = Ddim::new(&sd.schedule, 50).unwrap();
    let set = lora.as_set();
    let mut step_once = || {
        let input = Tensor::cat(&[&x1, &x1], 0).unwrap();
        let t = Tensor::new(&[500f32, 500.], &dev).unwrap();
        let eps = sd
            .unet
            .forward(
                &input,
                &t,
                &ctx2,
                Ctx {
                    lora: Some(&set),
                    probe: None,
                },
            )
            .unwrap();
        let (u, c) = (eps.narrow(0, 0, 1).unwrap(), eps.narrow(0, 1, 1).unwrap());
        let eps = (&u + ((c - &u).unwrap() * 7.5).unwrap()).unwrap();
        ddim.step(&eps, 501, &x1).unwrap();
    };
    let step = time(reps, &mut step_once);
    println!(
        "{name:>5} latent {latent}x{latent} ({} px): U-Net fwd+bwd, LoRA r32, batch 6: {train:.3} s/step | DDIM step, CFG batch 2: {step:.3} s/step | peak RSS {:.0} MB",
        latent * 8,
        peak_rss_mb()
    );
    println!("{name} U-Net fwd+bwd, profiled:");
    profile_once(train_once);
    println!("{name} DDIM step, profiled:");
    profile_once(step_once);
}

/// A 3+3 pair folder of generated images (a disc on a background, the disc as mask).
fn make_pair(root: &std::path::Path) -> std::path::PathBuf {
    use image::{ImageBuffer, Luma, Rgb};
    let dir = root.join("person_k+hair_c");
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for (s, name) in [(0, "person_k"), (1, "hair_c")] {
        for k in 1..=3u32 {
            let inside = |x: u32, y: u32| {
                (x as i32 - 64 - k as i32 * 4).pow(2) + (y as i32 - 64).pow(2) < 1600
            };
            let img = ImageBuffer::from_fn(128, 128, |x, y| {
                if inside(x, y) {
                    Rgb([200u8, 100, 50 * s as u8])
                } else {
                    Rgb([90, 140, 200])
                }
            });
            img.save(dir.join(format!("{s}_{name}{k}.png"))).unwrap();
            let m = ImageBuffer::from_fn(128, 128, |x, y| {
                Luma([if inside(x, y) { 255u8 } else { 0 }])
            });
            m.save(dir.join(format!("masks/{s}_{name}{k}.png")))
                .unwrap();
        }
    }
    dir
}

/// Seconds per warm-up step and per DS-Bal step of the real trainer (3+3 images).
fn bench_train(
    name: &str,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
    reps: usize,
) {
    use magictailor::train::{
        trainer::{Progress, Trainer},
        TrainConfig,
    };
    let mut cfg = TrainConfig::new(
        pair.to_path_buf(),
        std::env::temp_dir().join("unused"),
        model.to_string_lossy().into_owned(),
    );
    // One DS-Bal step more than timed: the profiled one.
    (cfg.warmup_steps, cfg.dsbal_steps, cfg.resolution) = (reps + 1, reps + 2, resolution);
    let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).expect("trainer");
    let mut times = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let s = Instant::now();
                t.train_step().unwrap();
                s.elapsed().as_secs_f64()
            })
            .collect()
    };
    let warm = times(reps + 1);
    let dsbal = times(reps + 1);
    println!(
        "{name:>5} MagicTailor step, 3+3 images at {resolution} px: warm-up {:.3} s/step | DS-Bal {:.3} s/step | peak RSS {:.0} MB",
        median(warm[1..].to_vec()),
        median(dsbal[1..].to_vec()),
        peak_rss_mb()
    );
    println!("{name} DS-Bal step, profiled:");
    profile_once(|| {
        t.train_step().unwrap();
    });
}

/// Seconds per image of `magictailor masks` (attention, then with MobileSAM refinement)
/// on the pair's 6 images, model loading excluded.
fn bench_masks(name: &str, model: &std::path::Path, pair: &std::path::Path, resolution: usize) {
    use magictailor::data::{MaskPolicy, PairDataset};
    use magictailor::masks::{self, sam::Refiner, AttentionOptions, MaskRecord};
    let sd = magictailor::model::loader::StableDiffusion::load(
        &model.to_string_lossy(),
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let data = PairDataset::load(pair, resolution, MaskPolicy::WholeImage, &Device::Cpu).unwrap();
    let record = MaskRecord {
        method: "attention".into(),
        model: sd.source.clone(),
        attention: AttentionOptions {
            resolution,
            ..Default::default()
        },
        sam_model: None,
    };
    let n = data.num_images() as f64;
    let s = Instant::now();
    masks::compute(&sd, &data, &record, None, false).unwrap();
    let attention = s.elapsed().as_secs_f64() / n;
    let sam_file =
        std::env::temp_dir().join(format!("bench-sam-{}.safetensors", std::process::id()));
    magictailor::model::tiny::write_sam(&sam_file, 0).unwrap();
    let sam = Refiner::load(&sam_file.to_string_lossy(), &Device::Cpu).unwrap();
    let s = Instant::now();
    masks::compute(&sd, &data, &record, Some(&sam), false).unwrap();
    let with_sam = s.elapsed().as_secs_f64() / n;
    let _ = std::fs::remove_file(&sam_file);
    println!(
        "{name:>5} masks at {resolution} px: attention {attention:.3} s/image | + MobileSAM (1024 px) {with_sam:.3} s/image | peak RSS {:.0} MB",
        peak_rss_mb()
    );
}

fn main() {
    magictailor::device::tune_cpu_runtime();
    // MAGICTAILOR_BENCH_DIR keeps the models and pair folder for scripts/bench_pytorch.py.
    let keep = std::env::var_os("MAGICTAILOR_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("magictailor-bench-{}", std::process::id()))
    });
    let tiny = tmp.join("tiny");
    let mid = tmp.join("mid");
    magictailor::model::tiny::write(&tiny, 0).unwrap();
    let te_mid = magictailor::model::tiny::mid_text_encoder_config();
    magictailor::model::tiny::write_with(
        &mid,
        0,
        &magictailor::model::tiny::mid_unet_config(),
        &magictailor::model::tiny::vae_config(),
        &te_mid,
    )
    .unwrap();
    println!(
        "threads: {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default (physical cores)".into())
    );
    let pair = make_pair(&tmp);
    // `cargo bench -- mid` runs only the rows whose name contains a given word.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |row: &str| filters.is_empty() || filters.iter().any(|f| row.contains(f.as_str()));
    if wanted("tiny-unet") {
        reset_peak();
        bench("tiny", &tiny, 16, 5);
    }
    if wanted("tiny-train") {
        reset_peak();
        bench_train("tiny", &tiny, &pair, 128, 5);
    }
    if wanted("mid-unet") {
        reset_peak();
        bench("mid", &mid, 32, 3);
    }
    if wanted("mid-train") {
        reset_peak();
        bench_train("mid", &mid, &pair, 256, 3);
    }
    if wanted("mid-masks") {
        reset_peak();
        bench_masks("mid", &mid, &pair, 256);
    }
    if wanted("naive-attention") {
        // The memory the flash-style attention saves: the same step with attention
        // composed from candle ops, [b, heads, n, n] probabilities kept for backward.
        magictailor::model::ops::use_reference_attention(true);
        reset_peak();
        bench_train("mid, naive attention,", &mid, &pair, 256, 2);
        magictailor::model::ops::use_reference_attention(false);
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
