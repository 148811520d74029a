//! `cargo bench`: seconds per MagicTailor training step (warm-up and DS-Bal, 3+3 images),
//! per U-Net forward+backward with LoRA (rank 32 at the MagicTailor targets, batch 6) and
//! per DDIM step (CFG, batch 2), for the tiny and a mid-size config, with each row's peak
//! resident memory; and the mid step with naive attention, for the memory it costs. The
//! `sdxl` rows: SDXL's structure at a quarter of its width (U-Net fwd+bwd, DDIM step, a
//! whole 50-step sampling, a MagicTailor training step, at 256 px).
//!
//! `MAGICTAILOR_BENCH_DEVICE=cuda` (and `MAGICTAILOR_BENCH_DTYPE=bf16|f16|f32`) runs the
//! rows on that device and adds the `full` rows: SD 2.1-base's full topology with random
//! weights at 512 px (training steps, DDIM step, a whole 50-step sampling). On CUDA the
//! peak memory is not read here (candle keeps no allocator statistics):
//! `scripts/gpu_session.sh` polls nvidia-smi around each bench process.
//!
//! After its timed repetitions each row runs once more with profiling on and prints
//! where that repetition's time went (`magictailor::profile`); the timings themselves
//! are unprofiled unless `MAGICTAILOR_PROFILE=1` is set (which measures its overhead).
//!
//! Speed is reported, never asserted. `scripts/bench_pytorch.py` runs the same rows in
//! PyTorch on the models kept by `MAGICTAILOR_BENCH_DIR`; numbers in benches/README.md.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use magictailor::infer::{decode, sample, Weights};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::TrainableLora;
use magictailor::model::nn::Ctx;
use magictailor::model::scheduler::Ddim;
use magictailor::model::tiny;
use magictailor::profile;
use magictailor::rng::seeded_normal;
use serde_json::json;

use magictailor::device::{peak_rss, reset_peak_rss as reset_peak};

fn peak_rss_mb() -> f64 {
    peak_rss().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `mid` rows' U-Net: SD 2.1's structure at a quarter of its width
/// (block_out_channels 80/160/320/320, head dim 16, 256-wide text features).
fn mid_unet_config() -> serde_json::Value {
    let mut c = tiny::unet_config();
    c["block_out_channels"] = json!([80, 160, 320, 320]);
    c["attention_head_dim"] = json!([5, 10, 20, 20]);
    c["norm_num_groups"] = json!(16);
    c["cross_attention_dim"] = json!(256);
    c["sample_size"] = json!(32);
    c
}

/// The `sdxl` rows' U-Net: SDXL's structure (3 levels, the first without attention,
/// 1/2/10 transformer blocks, the added size-and-text conditioning) at a quarter of its
/// width: 80/160/320 channels, head dim 16, 512-wide text features (192 + 320).
fn sdxl_unet_config() -> serde_json::Value {
    let mut c = mid_unet_config();
    c["block_out_channels"] = json!([80, 160, 320]);
    c["attention_head_dim"] = json!([5, 10, 20]);
    c["down_block_types"] = json!([
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D"
    ]);
    c["up_block_types"] = json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
    c["transformer_layers_per_block"] = json!([1, 2, 10]);
    c["cross_attention_dim"] = json!(512);
    c["addition_embed_type"] = json!("text_time");
    c["addition_time_embed_dim"] = json!(64);
    c["projection_class_embeddings_input_dim"] = json!(320 + 6 * 64);
    c
}

/// The `sdxl` rows' text encoders: CLIP-L's and OpenCLIP-bigG's shapes at a quarter width
/// and 4 layers, the second projecting its pooled output.
fn sdxl_text_encoder_configs() -> (serde_json::Value, serde_json::Value) {
    let mut one = mid_text_encoder_config();
    one["hidden_size"] = json!(192);
    one["intermediate_size"] = json!(768);
    let mut two = mid_text_encoder_config();
    two["hidden_size"] = json!(320);
    two["intermediate_size"] = json!(1280);
    two["num_attention_heads"] = json!(5);
    two["projection_dim"] = json!(320);
    two["hidden_act"] = json!("gelu");
    two["architectures"] = json!(["CLIPTextModelWithProjection"]);
    (one, two)
}

/// The `mid` rows' text encoder (with the tiny tokenizer; the VAE is the tiny one too).
fn mid_text_encoder_config() -> serde_json::Value {
    let mut c = tiny::text_encoder_config(tiny::tiny_vocab().0.len());
    c["hidden_size"] = json!(256);
    c["intermediate_size"] = json!(1024);
    c["num_attention_heads"] = json!(4);
    c["num_hidden_layers"] = json!(4);
    c
}

/// Where and in which precision the rows run (`MAGICTAILOR_BENCH_DEVICE`, `..._DTYPE`).
struct Target {
    dev: Device,
    dtype: DType,
}

/// One more training step of `t` with profiling on, its table headed `what`.
fn profile_step(what: &str, t: &mut magictailor::train::Trainer) {
    println!("{what}, profiled:");
    profile_once(|| {
        t.train_step().unwrap();
    });
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

impl Target {
    /// Waits for the device's queued work: CUDA kernels run asynchronously.
    fn sync(&self) {
        self.dev.synchronize().expect("device synchronize");
    }

    /// Median seconds of `reps` calls after a warm-up call, each call synchronized.
    fn time<F: FnMut()>(&self, reps: usize, mut f: F) -> f64 {
        f(); // warm-up
        self.sync();
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    self.sync();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    }

    /// Peak resident memory on the CPU; on a GPU the runner's nvidia-smi poll says it.
    fn peak(&self) -> String {
        match self.dev {
            Device::Cpu => format!("peak RSS {:.0} MB", peak_rss_mb()),
            _ => "peak GPU memory: see the runner's nvidia-smi poll".into(),
        }
    }
}

fn bench(tg: &Target, name: &str, dir: &std::path::Path, latent: usize, reps: usize) {
    let (dev, dtype) = (&tg.dev, tg.dtype);
    let sd = StableDiffusion::load(dir.to_str().unwrap(), dev, dtype).expect("model");
    let hidden = sd.unet.config.cross_attention_dim;
    // LoRA weights stay f32 whatever the model's dtype, as the trainer keeps them.
    let lora = TrainableLora::new(&sd.unet.lora_targets(), 32, 32.0, 0, dev, DType::F32).unwrap();
    let normal = |seed, shape: &[usize]| {
        seeded_normal(seed, shape, dev)
            .and_then(|t| Ok(t.to_dtype(dtype)?))
            .unwrap()
    };
    let ctx6 = normal(1, &[6, 77, hidden]);
    // SDXL's added conditioning: pooled text and the six sizes of the image.
    let added = |b: usize| {
        let pooled = sd.text_encoder_2.as_ref()?.0.config.projection_dim;
        let side = (latent * 8) as f32;
        let sizes = [side, side, 0., 0., side, side].repeat(b);
        Some(magictailor::model::nn::AddedCond {
            text_embeds: seeded_normal(6, (b, pooled), dev).unwrap(),
            time_ids: Tensor::from_vec(sizes, (b, 6), dev).unwrap(),
        })
    };
    let added6 = added(6);
    let x6 = normal(2, &[6, 4, latent, latent]);
    let t6 = Tensor::new(&[10f32, 200., 400., 600., 800., 990.], dev).unwrap();
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
                    added: added6.as_ref(),
                    ..Ctx::default()
                },
            )
            .unwrap();
        let loss = out
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(lora.modules[0].a.as_tensor()).is_some());
    };
    let train = tg.time(reps, &mut train_once);
    let set = lora.as_set();
    let mut step_once = ddim_step(tg, &sd, Some(&set), latent);
    let step = tg.time(reps, &mut step_once);
    println!(
        "{name:>5} latent {latent}x{latent} ({} px): U-Net fwd+bwd, LoRA r32, batch 6: {train:.3} s/step | DDIM step, CFG batch 2: {step:.3} s/step | {}",
        latent * 8,
        tg.peak()
    );
    println!("{name} U-Net fwd+bwd, profiled:");
    profile_once(train_once);
    println!("{name} DDIM step, profiled:");
    profile_once(step_once);
}

/// One DDIM step of `sd`'s U-Net (with `lora`, if any) at `latent`, CFG batch 2, from
/// fixed latents and random text features.
fn ddim_step<'a>(
    tg: &'a Target,
    sd: &'a StableDiffusion,
    lora: Option<&'a magictailor::model::lora::LoraSet>,
    latent: usize,
) -> impl FnMut() + 'a {
    let (dev, dtype) = (&tg.dev, tg.dtype);
    let hidden = sd.unet.config.cross_attention_dim;
    let ctx2 = seeded_normal(3, (2, 77, hidden), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    // SDXL's added conditioning: pooled text and the six sizes of the image.
    let added2 = sd.text_encoder_2.as_ref().map(|(te, _)| {
        let side = (latent * 8) as f32;
        magictailor::model::nn::AddedCond {
            text_embeds: seeded_normal(6, (2, te.config.projection_dim), dev).unwrap(),
            time_ids: Tensor::from_vec([side, side, 0., 0., side, side].repeat(2), (2, 6), dev)
                .unwrap(),
        }
    });
    // The latents stay f32 between steps and the U-Net sees them in its dtype, as in infer.
    let x1 = seeded_normal(4, (1, 4, latent, latent), dev).unwrap();
    let ddim = Ddim::new(&sd.schedule, 50).unwrap();
    move || {
        let input = Tensor::cat(&[&x1, &x1], 0)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let t = Tensor::new(&[500f32, 500.], dev).unwrap();
        let ctx = Ctx {
            lora,
            added: added2.as_ref(),
            ..Ctx::default()
        };
        let eps = (sd.unet.forward(&input, &t, &ctx2, ctx))
            .and_then(|e| e.to_dtype(DType::F32))
            .unwrap();
        let (u, c) = (eps.narrow(0, 0, 1).unwrap(), eps.narrow(0, 1, 1).unwrap());
        let eps = (&u + ((c - &u).unwrap() * 7.5).unwrap()).unwrap();
        ddim.step(&eps, 501, &x1).unwrap();
    }
}

/// Seconds per DDIM step of SDXL-base's U-Net (random weights of the real shape) at 1024
/// px, CFG batch 2, no adapters; the time to load it; and the peak memory (`reps` 0: the
/// load alone).
fn bench_xl_1024(tg: &Target, dir: &std::path::Path, reps: usize) {
    let s = Instant::now();
    let model = tiny::ensure_sdxl_unet_shapes(dir).expect("SDXL-shaped model");
    println!(
        " SDXL-base U-Net shapes ready in {:.1} s",
        s.elapsed().as_secs_f64()
    );
    reset_peak();
    let s = Instant::now();
    let sd = StableDiffusion::load(model.to_str().unwrap(), &tg.dev, tg.dtype).expect("model");
    let load = s.elapsed().as_secs_f64();
    // The load's peak apart from the steps': what loading holds, and what sampling does.
    let load_peak = tg.peak();
    if reps == 0 {
        println!("xl1024 SDXL-base U-Net: load {load:.1} s, {load_peak}");
        return;
    }
    reset_peak();
    let mut step_once = ddim_step(tg, &sd, None, 128);
    let step = tg.time(reps, &mut step_once);
    println!(
        "xl1024 SDXL-base U-Net at 1024 px: load {load:.1} s, {load_peak} | DDIM step, CFG batch 2: {step:.3} s/step | steps' {}",
        tg.peak()
    );
}

/// Seconds per image of what `magictailor infer` does after loading: prompt and empty
/// prompt through the text encoder, `steps` DDIM steps with CFG 7.5, VAE decode, pixels
/// to the host (as diffusers' pipeline with `output_type="np"`).
fn bench_infer(tg: &Target, name: &str, dir: &std::path::Path, latent: usize, reps: usize) {
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &tg.dev, tg.dtype).expect("model");
    let w = Weights {
        sd: &sd,
        lora: None,
        tuned: None,
        extra_rows: None,
        extra_rows_2: None,
        token_table: None,
        token_table_2: None,
        vico: None,
    };
    let secs = time_infer(tg, w, "a photo of a dog", latent, reps);
    println!(
        "{name:>5} infer at {} px: 50 DDIM steps, CFG 7.5, + VAE decode: {secs:.3} s/image | {}",
        latent * 8,
        tg.peak()
    );
}

/// Seconds per image of a 50-step sampling with CFG 7.5 of `prompt`, decoded to pixels.
fn time_infer(tg: &Target, w: Weights, prompt: &str, latent: usize, reps: usize) -> f64 {
    let latents = seeded_normal(5, (1, 4, latent, latent), &tg.dev).unwrap();
    tg.time(reps, || {
        let x = sample(w, prompt, "", latents.clone(), 50, 7.5, false).expect("sampling");
        let pixels = decode(w, &x).expect("decode");
        pixels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    })
}

/// The model in `dir` with one pseudo-word `<v0>` (a random row) and the pair's first
/// image as its reference.
fn one_word(
    tg: &Target,
    dir: &std::path::Path,
    pair: &std::path::Path,
) -> (StableDiffusion, Tensor, Vec<std::path::PathBuf>) {
    let mut sd = StableDiffusion::load(dir.to_str().unwrap(), &tg.dev, tg.dtype).expect("model");
    sd.tokenizer.add_pseudo_words(&["<v0>".into()]).unwrap();
    let hidden = sd.text_encoder.config.hidden_size;
    let rows = seeded_normal(1, (1, hidden), &tg.dev).unwrap();
    let references = magictailor::data::first_images(pair).unwrap()[..1].to_vec();
    (sd, rows, references)
}

/// `infer --reference` after loading: [`bench_infer`] with ViCo's blocks (new ones) and
/// the pair's first image as `<v0>`'s reference (the reference pass once per step for
/// both texts).
fn bench_vico_infer(
    tg: &Target,
    name: &str,
    dir: &std::path::Path,
    pair: &std::path::Path,
    latent: usize,
) {
    use magictailor::model::vico;
    let (sd, rows, references) = one_word(tg, dir, pair);
    let blocks = vico::Blocks::init(&vico::sites(&sd.unet), 0, &tg.dev, DType::F32).unwrap();
    let visual = magictailor::infer::vico::Visual::new(&blocks, references);
    let w = Weights {
        sd: &sd,
        lora: None,
        tuned: None,
        extra_rows: Some(&rows),
        extra_rows_2: None,
        token_table: None,
        token_table_2: None,
        vico: Some(&visual),
    };
    let secs = time_infer(tg, w, "a photo of <v0>", latent, 1);
    println!(
        "{name:>5} ViCo infer at {} px: 50 DDIM steps, CFG 7.5, + VAE decode: {secs:.3} s/image | {}",
        latent * 8,
        tg.peak()
    );
}

/// `infer --retouch` after loading, against plain `infer` on the same model and prompt:
/// seconds per image (stage 1, the layout's inversion and the three-path retouch) and
/// peak memory, with `<v0>` a random row and the pair's first image its reference. The
/// first image also inverts the reference (once per command); the second reads it back.
fn bench_retouch(
    tg: &Target,
    name: &str,
    dir: &std::path::Path,
    pair: &std::path::Path,
    latent: usize,
) {
    use magictailor::infer::retouch::{self, Retouch, Stage};
    use magictailor::infer::{Personalized, Prompted, Sampling};
    let (sd, rows, references) = one_word(tg, dir, pair);
    let mut p = Personalized {
        sd,
        lora: None,
        extra_rows: Some(rows),
        extra_rows_2: None,
        embeds_2: None,
        token_table: None,
        token_table_2: None,
        tuned: None,
        class_words: Default::default(),
        vico: None,
        retouch: None,
    };
    p.retouch = Some(Stage::new(references, None, retouch::KV_CACHE_MB));
    let side = latent * p.sd.vae_factor();
    let plain = Sampling {
        width: side,
        height: side,
        ..Sampling::default()
    };
    let retouched = Sampling {
        retouch: Some(Retouch::defaults(plain.steps)),
        ..plain.clone()
    };
    let noise = seeded_normal(5, (1, 4, latent, latent), &tg.dev).unwrap();
    let draw = |s: &Sampling| {
        let t = Instant::now();
        let prompted = Prompted::new(&p, "a photo of <v0>", s).expect("prompt");
        prompted.draw(noise.clone(), || {}).expect("draw");
        tg.sync();
        t.elapsed().as_secs_f64()
    };
    reset_peak();
    let plain_s = draw(&plain);
    let plain_peak = tg.peak();
    reset_peak();
    let (first, second) = (draw(&retouched), draw(&retouched));
    println!(
        "{name:>5} infer at {side} px, 50 DDIM steps, CFG 7.5, + VAE decode: plain {plain_s:.3} s/image ({plain_peak}) | \
         --retouch {first:.3} s first image, {second:.3} s after (the reference's inversion kept) | {}",
        tg.peak()
    );
}

/// The real trainer on the pair at `resolution`, with the settings `set` gives, in the
/// bench's device and dtype (as `magictailor train --dtype ...` sets them).
fn trainer(
    tg: &Target,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
    set: impl FnOnce(&mut magictailor::train::TrainConfig),
) -> magictailor::train::Trainer {
    use magictailor::io::progress::Progress;
    use magictailor::train::{TrainConfig, Trainer};
    let mut cfg = TrainConfig::new(
        pair.to_path_buf(),
        std::env::temp_dir().join("unused"),
        model.to_string_lossy().into_owned(),
    );
    cfg.resolution = resolution;
    (cfg.dtype, cfg.loss_scale) = (tg.dtype, TrainConfig::default_loss_scale(tg.dtype));
    set(&mut cfg);
    Trainer::new(cfg, &tg.dev, Progress::Quiet).expect("trainer")
}

/// Seconds of each of `n` steps of `t`.
fn step_times(tg: &Target, t: &mut magictailor::train::Trainer, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let s = Instant::now();
            t.train_step().unwrap();
            tg.sync();
            s.elapsed().as_secs_f64()
        })
        .collect()
}

/// Seconds per warm-up step and per DS-Bal step of the real trainer (3+3 images).
fn bench_train(
    tg: &Target,
    name: &str,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
    reps: usize,
) {
    // One DS-Bal step more than timed: the profiled one.
    let mut t = trainer(tg, model, pair, resolution, |c| {
        (c.warmup_steps, c.dsbal_steps) = (reps + 1, reps + 2)
    });
    let warm = step_times(tg, &mut t, reps + 1);
    let dsbal = step_times(tg, &mut t, reps + 1);
    println!(
        "{name:>5} MagicTailor step, 3+3 images at {resolution} px: warm-up {:.3} s/step | DS-Bal {:.3} s/step | {}",
        median(warm[1..].to_vec()),
        median(dsbal[1..].to_vec()),
        tg.peak()
    );
    profile_step(&format!("{name} DS-Bal step"), &mut t);
}

/// Seconds per step of a one-phase method: `ti` (4 images, only the pseudo-word rows
/// train: text encoder and U-Net backward, no adapters) or `dreambooth` (1 image, rank-4
/// LoRA on the attention projections).
fn bench_one_phase(
    tg: &Target,
    name: &str,
    method: magictailor::train::method::Method,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
    reps: usize,
) {
    let mut t = trainer(tg, model, pair, resolution, |c| {
        (c.method, c.steps) = (method, Some(reps + 2))
    });
    let per_step = t.cfg.images_per_step();
    let times = step_times(tg, &mut t, reps + 1);
    let label = match method.name() {
        "ti" => "TI",
        "dreambooth" => "DreamBooth",
        "custom-diffusion" => "Custom Diffusion",
        "clic" => "CLiC",
        _ => "ViCo",
    };
    println!(
        "{name:>5} {label} step, {per_step} image{} at {resolution} px: {:.3} s/step | {}",
        if per_step == 1 { "" } else { "s" },
        median(times[1..].to_vec()),
        tg.peak()
    );
    profile_step(&format!("{name} {label} step"), &mut t);
}

/// Seconds per Break-A-Scene phase-2 step (every weight, or `lora` adapters of that rank)
/// on one sample's images, so every step trains one image, as the source's batch of 1;
/// prior preservation off (its class image would double the batch on both sides).
fn bench_break_a_scene(
    tg: &Target,
    name: &str,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
    reps: usize,
    lora: Option<usize>,
) {
    let mut t = trainer(tg, model, pair, resolution, |c| {
        c.method = magictailor::train::method::Method::BreakAScene;
        (c.phase1_steps, c.phase2_steps) = (0, reps + 2);
        (c.no_prior_preservation, c.phase2_lora) = (true, lora);
    });
    let times = step_times(tg, &mut t, reps + 1);
    let what = match lora {
        Some(r) => format!("LoRA r{r} + words"),
        None => "every U-Net and text-encoder weight + words".into(),
    };
    println!(
        "{name:>5} Break-A-Scene phase-2 step ({what}), 1 image at {resolution} px: {:.3} s/step | {}",
        median(times[1..].to_vec()),
        tg.peak()
    );
    profile_step(&format!("{name} Break-A-Scene phase-2 step"), &mut t);
}

/// The first sample of `pair` as a folder of its own (`person_k/`, images and masks).
fn one_sample(pair: &std::path::Path) -> std::path::PathBuf {
    let dir = pair.with_file_name("person_k");
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for sub in ["", "masks"] {
        for e in std::fs::read_dir(pair.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with("0_") {
                std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    dir
}

/// Seconds per image of `magictailor masks` (attention, then with MobileSAM refinement)
/// on the pair's 6 images, model loading excluded.
fn bench_masks(
    tg: &Target,
    name: &str,
    model: &std::path::Path,
    pair: &std::path::Path,
    resolution: usize,
) {
    use magictailor::data::{MaskPolicy, PairDataset};
    use magictailor::masks::{self, sam::Refiner, AttentionOptions, MaskRecord};
    let sd = StableDiffusion::load(&model.to_string_lossy(), &tg.dev, tg.dtype).unwrap();
    let data = PairDataset::load(pair, resolution, MaskPolicy::WholeImage, &tg.dev).unwrap();
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
    magictailor::testkit::models::write_sam(&sam_file, 0).unwrap();
    let sam = Refiner::load(&sam_file.to_string_lossy(), &tg.dev).unwrap();
    let s = Instant::now();
    masks::compute(&sd, &data, &record, Some(&sam), false).unwrap();
    let with_sam = s.elapsed().as_secs_f64() / n;
    let _ = std::fs::remove_file(&sam_file);
    println!(
        "{name:>5} masks at {resolution} px: attention {attention:.3} s/image | + MobileSAM (1024 px) {with_sam:.3} s/image | {}",
        tg.peak()
    );
}

/// Writes the full-size random model once: a kept `MAGICTAILOR_BENCH_DIR` reuses it (its
/// 5.2 GB of f32 take a while to draw and write).
fn ensure_full(dir: &std::path::Path) {
    let s = Instant::now();
    if !dir.join("model_index.json").is_file() {
        tiny::ensure_sd21_shapes(dir).expect("full model");
        println!(
            " full model (SD 2.1-base shapes, random f32) written in {:.1} s",
            s.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    magictailor::device::tune_cpu_runtime();
    // Unset: CPU in f32, the rows of benches/README.md. Set: that device, plus `full`.
    let selected = std::env::var("MAGICTAILOR_BENCH_DEVICE").ok();
    let dev = magictailor::device::parse(selected.as_deref().unwrap_or("cpu")).expect("device");
    let dtype = match std::env::var("MAGICTAILOR_BENCH_DTYPE").as_deref() {
        Err(_) | Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok("f16") => DType::F16,
        Ok(d) => panic!("MAGICTAILOR_BENCH_DTYPE={d}: expected f32, bf16 or f16"),
    };
    let tg = Target { dev, dtype };
    // MAGICTAILOR_BENCH_DIR keeps the models and pair folder for scripts/bench_pytorch.py.
    let keep = std::env::var_os("MAGICTAILOR_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("magictailor-bench-{}", std::process::id()))
    });
    // `cargo bench -- mid` runs only the rows whose name contains a given word.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |row: &str| {
        (selected.is_some() || !row.starts_with("full"))
            && (filters.is_empty() || filters.iter().any(|f| row.contains(f.as_str())))
    };
    let (tiny, mid, full) = (tmp.join("tiny"), tmp.join("mid"), tmp.join("full"));
    let tiny_rows = [
        "tiny-unet",
        "tiny-train",
        "tiny-ti",
        "tiny-dreambooth",
        "tiny-custom-diffusion",
        "tiny-clic",
        "tiny-vico",
    ];
    if tiny_rows.iter().any(|r| wanted(r)) {
        tiny::write(&tiny, 0).unwrap();
    }
    let mid_rows = [
        "mid-unet",
        "mid-train",
        "mid-ti",
        "mid-dreambooth",
        "mid-custom-diffusion",
        "mid-clic",
        "mid-vico",
        "mid-break-a-scene-full",
        "mid-break-a-scene-lora",
        "mid-vico-infer",
        "mid-retouch",
        "mid-masks",
        "naive-attention",
    ];
    if mid_rows.iter().any(|r| wanted(r)) {
        let te_mid = mid_text_encoder_config();
        tiny::write_with(&mid, 0, &mid_unet_config(), &tiny::vae_config(), &te_mid).unwrap();
    }
    // `full-model` alone writes it (scripts/gpu_session.sh, before the timed processes).
    if [
        "full-model",
        "full-train",
        "full-vico",
        "full-ddim",
        "full-infer",
        "full-retouch",
        "full-break-a-scene-full",
        "full-break-a-scene-lora",
    ]
    .iter()
    .any(|r| wanted(r))
    {
        ensure_full(&full);
    }
    println!(
        "device {:?}, dtype {:?}, threads: {}",
        tg.dev.location(),
        tg.dtype,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default (physical cores)".into())
    );
    // The pair `doctor --estimate` trains on.
    let pair = magictailor::data::synthetic::write_pair(&tmp).expect("pair folder");
    if wanted("tiny-unet") {
        reset_peak();
        bench(&tg, "tiny", &tiny, 16, 5);
    }
    if wanted("tiny-train") {
        reset_peak();
        bench_train(&tg, "tiny", &tiny, &pair, 128, 5);
    }
    use magictailor::train::method::Method;
    for method in [
        Method::Ti,
        Method::DreamBooth,
        Method::CustomDiffusion,
        Method::Clic,
        Method::Vico,
    ] {
        if wanted(&format!("tiny-{}", method.name())) {
            reset_peak();
            bench_one_phase(&tg, "tiny", method, &tiny, &pair, 128, 5);
        }
    }
    if wanted("mid-unet") {
        reset_peak();
        bench(&tg, "mid", &mid, 32, 3);
    }
    if wanted("mid-train") {
        reset_peak();
        bench_train(&tg, "mid", &mid, &pair, 256, 3);
    }
    for method in [
        Method::Ti,
        Method::DreamBooth,
        Method::CustomDiffusion,
        Method::Clic,
        Method::Vico,
    ] {
        if wanted(&format!("mid-{}", method.name())) {
            reset_peak();
            bench_one_phase(&tg, "mid", method, &mid, &pair, 256, 3);
        }
    }
    if wanted("mid-break-a-scene-full") {
        let one = one_sample(&pair);
        reset_peak();
        bench_break_a_scene(&tg, "mid", &mid, &one, 256, 3, None);
    }
    if wanted("mid-break-a-scene-lora") {
        let one = one_sample(&pair);
        reset_peak();
        bench_break_a_scene(&tg, "mid", &mid, &one, 256, 3, Some(4));
    }
    if wanted("mid-vico-infer") {
        reset_peak();
        bench_vico_infer(&tg, "mid", &mid, &pair, 32);
    }
    if wanted("mid-retouch") {
        bench_retouch(&tg, "mid", &mid, &pair, 64);
    }
    if wanted("mid-masks") {
        reset_peak();
        bench_masks(&tg, "mid", &mid, &pair, 256);
    }
    if wanted("naive-attention") {
        // The memory the flash-style attention saves: the same step with attention
        // composed from candle ops, [b, heads, n, n] probabilities kept for backward.
        magictailor::model::ops::use_reference_attention(true);
        reset_peak();
        bench_train(&tg, "mid, naive attention,", &mid, &pair, 256, 2);
        magictailor::model::ops::use_reference_attention(false);
    }
    if wanted("sdxl-unet") || wanted("sdxl-infer") || wanted("sdxl-train") {
        let sdxl = tmp.join("sdxl");
        let (te, te2) = sdxl_text_encoder_configs();
        let mut vae = tiny::vae_config();
        vae["scaling_factor"] = json!(0.13025);
        tiny::write_sdxl(&sdxl, 0, &sdxl_unet_config(), &vae, &te, &te2).unwrap();
        if wanted("sdxl-unet") {
            reset_peak();
            bench(&tg, "sdxl", &sdxl, 32, 3);
        }
        if wanted("sdxl-infer") {
            reset_peak();
            bench_infer(&tg, "sdxl", &sdxl, 32, 2);
        }
        if wanted("sdxl-train") {
            reset_peak();
            bench_train(&tg, "sdxl", &sdxl, &pair, 256, 3);
        }
    }
    // Not in a plain `cargo bench`: 10 GB to write and two minutes a step on 2 cores
    // (`xl1024-load`: the load alone).
    if let Some(f) = (filters.iter()).find(|f| *f == "xl1024-ddim" || *f == "xl1024-load") {
        bench_xl_1024(
            &tg,
            &tmp.join("xl1024"),
            if f == "xl1024-load" { 0 } else { 2 },
        );
    }
    // The full rows, one process each in scripts/gpu_session.sh so that each has its own
    // nvidia-smi peak.
    if wanted("full-train") {
        bench_train(&tg, "full", &full, &pair, 512, 3);
    }
    if wanted("full-vico") {
        bench_one_phase(&tg, "full", Method::Vico, &full, &pair, 512, 3);
    }
    if wanted("full-ddim") {
        bench(&tg, "full", &full, 64, 5);
    }
    if wanted("full-infer") {
        bench_infer(&tg, "full", &full, 64, 3);
    }
    if wanted("full-retouch") {
        bench_retouch(&tg, "full", &full, &pair, 64);
    }
    for (row, lora) in [
        ("full-break-a-scene-full", None),
        ("full-break-a-scene-lora", Some(4)),
    ] {
        if wanted(row) {
            bench_break_a_scene(&tg, "full", &full, &one_sample(&pair), 512, 3, lora);
        }
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
