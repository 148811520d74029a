//! `magictailor train` on the tiny fixture model: learning happens, resume is exact,
//! the output folder feeds `infer`, and bad input leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device};
use common::*;
use magictailor::io::progress::Progress;
use magictailor::train::{trainer::Trainer, TrainConfig};

/// person_k+hair_c: 2 + 2 discs on a background (80x64 PNG), each disc its mask.
fn make_pair(root: &Path) -> PathBuf {
    pair_folder(root, &PairSpec::training())
}

fn config(pair: &Path, out: &Path, warmup: usize, dsbal: usize) -> TrainConfig {
    let mut cfg = TrainConfig::new(pair.to_path_buf(), out.to_path_buf(), tiny_sd());
    (cfg.warmup_steps, cfg.dsbal_steps, cfg.resolution) = (warmup, dsbal, 64);
    cfg
}

#[test]
fn the_masked_loss_falls_within_a_few_dozen_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let mut cfg = config(&pair, &tmp.path().join("out"), 40, 0);
    cfg.warmup_lr = 1e-3; // a tiny random model learns slowly at SD's rate
    let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    let probe = [100, 300, 500, 700];
    let start = t.probe_loss(&probe, 1).unwrap();
    for _ in 0..40 {
        t.train_step().unwrap();
    }
    let end = t.probe_loss(&probe, 1).unwrap();
    assert!(
        end < 0.8 * start,
        "masked loss at fixed t and noise: {start} -> {end}"
    );
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `next_gradients` are the gradients the next step applies. At step 1 B = 0, so A has
/// no gradient, and AdamW moves every B entry by lr * sign(g) however small |g| is (well
/// above eps): why backends that round differently disagree on B (docs/candle.md §7).
#[test]
fn the_first_step_moves_every_lora_b_entry_by_lr_times_the_sign_of_its_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let cfg = config(&pair, &tmp.path().join("out"), 1, 0);
    let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    let grads = t.next_gradients().unwrap();
    let log = t.train_step().unwrap();
    let (lr, clip) = (
        log.lr as f32,
        (1.0 / (log.grad_norm + 1e-6)).min(1.0) as f32,
    );
    let mut moved = 0;
    for (name, var) in t.trainable() {
        let g = values(&grads[&name]);
        if name.ends_with(".A") {
            assert!(
                g.iter().all(|&g| g == 0.0),
                "{name} has a gradient while B = 0"
            );
        } else if name.ends_with(".B") {
            for (g, w) in g.iter().zip(values(var.as_tensor())) {
                if (g * clip).abs() > 1e-5 {
                    assert!(
                        (w + lr * g.signum()).abs() < 2e-3 * lr,
                        "{name}: g {g}, w {w}"
                    );
                    moved += 1;
                }
            }
        }
    }
    assert!(moved > 100, "only {moved} B entries had a gradient");
}

fn train(args: &[&str]) -> Output {
    run_bin("train", args)
}

#[test]
fn resume_after_a_kill_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let pair = pair.to_str().unwrap();
    let model = tiny_sd();
    let full = tmp.path().join("full");
    ok(&train(&short_run_args(
        pair,
        full.to_str().unwrap(),
        &model,
    )));
    let ckpts: Vec<String> = std::fs::read_dir(full.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut ckpts = ckpts;
    ckpts.sort();
    // Every 3 steps, plus the switch to DS-Bal after step 4, and the end.
    assert_eq!(
        ckpts,
        [
            "step-000003.safetensors",
            "step-000004.safetensors",
            "step-000006.safetensors",
            "step-000008.safetensors"
        ]
    );

    // "Kill" after step 4 (at the switch) and after step 6 (inside DS-Bal, with momentum
    // adapters and optimizer moments in the checkpoint): keep only what existed then.
    for (kill_at, keep) in [(4, 2), (6, 3)] {
        let run = tmp.path().join(format!("killed-{kill_at}"));
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        for c in &ckpts[..keep] {
            std::fs::copy(
                full.join("checkpoints").join(c),
                run.join("checkpoints").join(c),
            )
            .unwrap();
        }
        let log = std::fs::read_to_string(full.join("train_log.jsonl")).unwrap();
        let partial: String = log
            .lines()
            .take(kill_at + 1)
            .map(|l| format!("{l}\n"))
            .collect(); // one line too many, as after a late kill
        std::fs::write(run.join("train_log.jsonl"), partial).unwrap();
        let mut args = short_run_args(pair, run.to_str().unwrap(), &model);
        args.push("--resume");
        ok(&train(&args));
        for f in [
            "pytorch_lora_weights.safetensors",
            "learned_embeds.safetensors",
        ] {
            assert!(
                read_bytes(&run.join(f)) == read_bytes(&full.join(f)),
                "{f} differs after resuming from step {kill_at}"
            );
        }
        assert_eq!(
            without_timings(&read_log(&run)),
            without_timings(&read_log(&full)),
            "log continues seamlessly"
        );
    }
}

#[test]
fn a_trained_folder_feeds_infer_and_logs_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny_sd();
    ok(&train(&short_run_args(
        pair.to_str().unwrap(),
        out.to_str().unwrap(),
        &model,
    )));
    let lines = read_log(&out);
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[3]["phase"], "warm-up");
    assert_eq!(lines[4]["phase"], "ds-bal");
    // 4 images: the rates are scaled by 4; DS-Bal chose a sample each step.
    assert!((lines[0]["lr"].as_f64().unwrap() - 4e-4).abs() < 1e-12);
    assert!((lines[4]["lr"].as_f64().unwrap() - 4e-5).abs() < 1e-12);
    assert!(lines[4..].iter().all(|l| l["chosen_sample"].is_u64()));
    assert_eq!(
        lines[4]["l_pres"], 0.0,
        "the momentum U-Net starts as a copy"
    );
    assert!(lines[6]["l_pres"].as_f64().unwrap() > 0.0);

    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
            .unwrap();
    assert_eq!(run_json["tokens"]["<v0>"], "person");
    assert_eq!(run_json["tokens"]["<v1>"], "hair");
    assert_eq!(run_json["steps_done"], 8);
    assert!(
        !out.join("token_embedding.safetensors").exists(),
        "only --released-script exports the whole token table"
    );

    let infer = |extra: &[&str], png: &Path| {
        let mut a = vec![
            "--prompt",
            "<v0> with <v1>",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet",
        ];
        a.extend(["--out", png.to_str().unwrap()]);
        a.extend(extra);
        bin_command("infer", &a)
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    let personal = tmp.path().join("p.png");
    ok(&infer(
        &["--model-dir", out.to_str().unwrap(), "--steps", "3"],
        &personal,
    ));
    assert_eq!(read_png(&personal).dimensions(), (64, 64));
    // Same noise without the LoRA (but with the learned words) gives another image.
    let embeds = out.join("learned_embeds.safetensors");
    let plain = tmp.path().join("q.png");
    ok(&infer(
        &[
            "--model",
            &model,
            "--embeds",
            embeds.to_str().unwrap(),
            "--steps",
            "3",
        ],
        &plain,
    ));
    assert!(
        png_max_diff(&read_png(&personal), &read_png(&plain)) > 0,
        "the trained adapters change the image"
    );

    // Leave the run and an image from fixed latents for scripts/check_rust_exports.py,
    // which loads the run into diffusers and must reproduce that image.
    let check = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train-check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    for f in [
        "pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
    ] {
        std::fs::copy(out.join(f), check.join(f)).unwrap();
    }
    let latents = fixtures().join("init_latents.safetensors");
    let args = [
        "--model-dir",
        out.to_str().unwrap(),
        "--init-latents",
        latents.to_str().unwrap(),
        "--steps",
        "10",
    ];
    ok(&infer(&args, &check.join("infer.png")));
}

/// SD 1.x (1x1-conv projections, quick_gelu, end-of-text padding) trains and samples
/// end to end. Leaves the run and an image from fixed latents in target/tmp/sd1-check/
/// for scripts/check_rust_exports.py, which loads the run into diffusers' SD 1.x tiny
/// pipeline and must reproduce that image.
#[test]
fn an_sd1_model_trains_and_its_files_feed_infer() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let model = SD1.model();
    ok(&train(&short_run_args(
        pair.to_str().unwrap(),
        out.to_str().unwrap(),
        &model,
    )));
    assert_eq!(read_log(&out).len(), 8);
    // The adapters of the 1x1-conv projections are 4-D, as peft and kohya store them.
    let lora =
        candle_core::safetensors::load(out.join("pytorch_lora_weights.safetensors"), &Device::Cpu)
            .unwrap();
    let proj = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight";
    assert_eq!(lora[proj].dims(), [32, 16, 1, 1], "rank 32, 16 channels in");

    let check = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sd1-check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    for f in [
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "learned_embeds.safetensors",
    ] {
        std::fs::copy(out.join(f), check.join(f)).unwrap();
    }
    let run = ["--model-dir", out.to_str().unwrap()];
    ok(&SD1.infer_like_reference(&run, &check.join("infer.png"), "<v0> with <v1>"));
}

#[test]
fn half_precision_training_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let run = |dtype: DType, loss_scale: Option<f64>| {
        let mut cfg = config(&pair, &tmp.path().join("unused"), 2, 2);
        (cfg.dtype, cfg.loss_scale) = (dtype, loss_scale);
        let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
        let logs: Vec<_> = (0..4).map(|_| t.train_step().unwrap()).collect();
        let lora = t.lora.modules[0]
            .b
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap();
        (logs, lora)
    };
    let (full, full_b) = run(DType::F32, None);
    let (half, half_b) = run(DType::F16, Some(1024.0));
    // Measured: losses agree to 3e-4 relative, LoRA B to 1% of how far it moved.
    for (f, h) in full.iter().zip(&half) {
        let rel = ((f.loss - h.loss) / f.loss).abs();
        assert!(
            rel < 0.02,
            "step {}: loss {} (f32) vs {} (f16)",
            f.step,
            f.loss,
            h.loss
        );
        assert!(
            h.grad_norm.is_finite(),
            "step {}: f16 gradients overflowed",
            h.step
        );
        assert_eq!(f.chosen_sample, h.chosen_sample);
    }
    // The adapters (f32 master weights) moved the same way: the B matrix starts at 0.
    let moved = full_b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (&full_b - &half_b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(
        moved > 0.0 && diff < 0.05 * moved,
        "LoRA B moved {moved}, f16 differs by {diff}"
    );
    assert_eq!(half_b.dtype(), DType::F32);
}

/// `train ARGS` fails cleanly (non-zero, no panic) with `needle` in its message and
/// creates no output folder `out`.
fn assert_train_refused(args: &[&str], out: &Path, needle: &str) {
    let r = train(args);
    let err = stderr(&r);
    assert!(
        !r.status.success() && err.contains(needle) && !err.contains("panicked"),
        "{needle}: {err}"
    );
    assert!(!out.exists(), "no output folder for bad input ({needle})");
}

#[test]
fn bad_training_input_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let pair = pair.to_str().unwrap();
    let model = tiny_sd();
    let out = tmp.path().join("never");
    let o = out.to_str().unwrap();
    let refused = |args: Vec<&str>, needle: &str| assert_train_refused(&args, &out, needle);
    let with = |extra: &[&'static str]| {
        let mut a = vec![
            "--instance-dir",
            pair,
            "--output-dir",
            o,
            "--model",
            &model,
            "--resolution",
            "64",
            "--quiet",
        ];
        a.extend(extra);
        a
    };
    refused(
        with(&["--warmup-steps", "0", "--dsbal-steps", "0"]),
        "nothing to train",
    );
    refused(with(&["--lora-rank", "0"]), "rank of at least 1");
    let mut a = with(&[]);
    set_arg(&mut a, "--resolution", "60");
    refused(a, "multiple of 8");
    let lonely = tmp.path().join("person_k");
    std::fs::create_dir(&lonely).unwrap();
    let mut a = with(&[]);
    set_arg(&mut a, "--instance-dir", lonely.to_str().unwrap());
    refused(a, "person_k+hair_c");
    std::fs::remove_file(Path::new(pair).join("masks/1_hair_c2.png")).unwrap();
    refused(with(&[]), "but not for 1_hair_c2");
    // An existing run is never overwritten without --resume.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let r = train(&with(&["--no-masks"]));
    assert!(!r.status.success() && stderr(&r).contains("--resume"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn released_script_switch_reproduces_its_three_departures() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let run = |released: bool| {
        let mut cfg = config(&pair, &tmp.path().join("unused"), 2, 3);
        cfg.released_script = released;
        let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
        let logs: Vec<_> = (0..5).map(|_| t.train_step().unwrap()).collect();
        (t, logs)
    };
    let lrs = |logs: &[magictailor::train::trainer::StepLog]| {
        logs.iter().map(|l| l.lr).collect::<Vec<_>>()
    };
    let pres = |logs: &[magictailor::train::trainer::StepLog]| {
        logs.iter().map(|l| l.l_pres).collect::<Vec<_>>()
    };

    let (paper, logs) = run(false);
    assert_eq!(
        lrs(&logs),
        [4e-4, 4e-4, 4e-5, 4e-5, 4e-5],
        "the paper holds DS-Bal's rate"
    );
    let p = pres(&logs);
    assert!(
        p[2] == 0.0 && p[3] > 0.0,
        "momentum = EMA from the switch: {p:?}"
    );
    assert!(
        paper.table.is_none(),
        "only the pseudo-word rows are trained"
    );

    let (released, logs) = run(true);
    // 1. The constant scheduler resets DS-Bal's rate after one step.
    assert_eq!(lrs(&logs), [4e-4, 4e-4, 4e-5, 4e-4, 4e-4]);
    // 2. The EMA wrapper hard-copies on its first update: L_pres is 0 for two steps.
    let p = pres(&logs);
    assert!(p[2] == 0.0 && p[3] == 0.0 && p[4] > 0.0, "{p:?}");
    // 3. The whole table is optimized with weight decay: a row no prompt uses only decays.
    let table = released.table.as_ref().expect("trainable table");
    let unused = 300u32;
    let ids = released
        .pool
        .all
        .ids
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    assert!(!ids.contains(&unused));
    let frozen = released
        .sd
        .text_encoder
        .token_row(unused)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let now = table
        .as_tensor()
        .get(unused as usize)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let decay: f64 = lrs(&logs).iter().map(|lr| 1.0 - lr * 0.01).product();
    for (f, n) in frozen.iter().zip(&now) {
        assert!(
            (*f as f64 * decay - *n as f64).abs() < 1e-7,
            "{f} * {decay} vs {n}"
        );
    }
    assert!(frozen != now, "the row drifted");
}

/// A reference image cut short (a JPEG missing only its end-of-image marker, which the
/// decoder would fill with grey) stops `train` before anything is written, naming the file.
#[test]
fn a_truncated_reference_image_stops_train_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::discs((80, 64), Format::Jpeg, 2));
    let cut = pair.join("0_person_k2.jpg");
    truncate_file(&cut, read_bytes(&cut).len() - 2);
    let out = tmp.path().join("never");
    let model = tiny_sd();
    let args = short_run_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    assert_train_refused(&args, &out, "0_person_k2.jpg");
}

/// 72 px gives a 9x9 latent: odd sides all the way down (9 -> 5 -> 3), so the U-Net's
/// upsampling must resize to non-integer factors and the attention probe must read
/// ceil(9 / 4) = 3. One warm-up and one DS-Bal step train, and the attention loss of
/// each is a real, positive number (it would be 0 or NaN if the probe read no maps).
#[test]
fn resolutions_not_a_multiple_of_32_train() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny_sd();
    let mut args = short_run_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    set_arg(&mut args, "--resolution", "72");
    set_arg(&mut args, "--warmup-steps", "1");
    set_arg(&mut args, "--dsbal-steps", "1");
    ok(&train(&args));
    let lines = read_log(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["phase"], "ds-bal");
    for l in &lines {
        let attn = l["l_attn"].as_f64().unwrap_or(f64::NAN);
        assert!(attn.is_finite() && attn > 0.0, "l_attn {attn} in {l}");
    }
}

/// The "w/o DS-Bal" ablation: after warm-up the joint phase trains the warm-up objective
/// at --dsbal-lr (scaled by the 4 images), with no preserving term and no chosen sample.
/// Flags only DS-Bal reads are warned about when set; none is warned about by default.
#[test]
fn no_ds_bal_trains_a_joint_phase_and_refuses_flags_it_would_ignore() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let pair = pair.to_str().unwrap();
    let model = tiny_sd();
    let args = |out: &'static str, extra: &[&'static str]| {
        let out = tmp.path().join(out);
        let mut a: Vec<String> = [
            "--instance-dir",
            pair,
            "--output-dir",
            out.to_str().unwrap(),
            "--model",
            &model,
            "--resolution",
            "64",
            "--no-ds-bal",
            "--json",
        ]
        .map(String::from)
        .into();
        a.extend(extra.iter().map(|s| s.to_string()));
        (out, a)
    };
    let run = |a: &[String]| train(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let (out, a) = args(
        "joint",
        &[
            "--warmup-steps",
            "1",
            "--dsbal-steps",
            "2",
            "--dsbal-lr",
            "2e-5",
        ],
    );
    let o = run(&a);
    ok(&o);
    assert!(
        !stderr(&o).contains("warning"),
        "no flag was set that --no-ds-bal ignores: {}",
        stderr(&o)
    );
    let lines = read_log(&out);
    let phases: Vec<&str> = lines.iter().map(|l| l["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["warm-up", "joint", "joint"]);
    for l in &lines[1..] {
        let lr = l["lr"].as_f64().unwrap();
        assert!(
            (lr - 4.0 * 2e-5).abs() < 1e-15,
            "joint lr {lr}: --dsbal-lr x 4 images"
        );
        assert_eq!(l["l_pres"], 0.0, "no preserving term: {l}");
        assert!(l["chosen_sample"].is_null(), "no sample is chosen: {l}");
    }

    let (out, a) = args(
        "refused",
        &[
            "--warmup-steps",
            "0",
            "--dsbal-steps",
            "1",
            "--ema-decay",
            "0.5",
        ],
    );
    let o = run(&a);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ema-decay only shapes DS-Bal") && !err.contains("--lambda-pres"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run writes nothing");
}

/// The released script optimizes and saves the whole token-embedding table: the run
/// folder holds it under the text encoder's own tensor name and shape, it has drifted
/// from the base model's table, and `infer` samples the folder with it.
#[test]
fn released_script_exports_the_whole_drifted_token_table() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny_sd();
    let mut args = short_run_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    set_arg(&mut args, "--warmup-steps", "1");
    set_arg(&mut args, "--dsbal-steps", "1");
    args.push("--released-script");
    ok(&train(&args));

    let key = magictailor::io::run::TOKEN_TABLE_KEY;
    assert_eq!(key, "text_model.embeddings.token_embedding.weight");
    let saved =
        candle_core::safetensors::load(out.join("token_embedding.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(saved.keys().collect::<Vec<_>>(), [key]);
    let base = candle_core::safetensors::load(
        fixtures().join("tiny-sd/text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // transformers' files use the full name; the tiny model's omits `text_model.`.
    let base = base
        .get(key)
        .or_else(|| base.get("embeddings.token_embedding.weight"))
        .expect("the base token table");
    let table = &saved[key];
    assert_eq!(table.dims(), base.dims());
    assert!(max_abs_diff(table, base) > 0.0, "the table drifted");

    let png = tmp.path().join("p.png");
    ok(&run_bin(
        "infer",
        &[
            "--model-dir",
            out.to_str().unwrap(),
            "--prompt",
            "<v0> with <v1>",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet",
            "--out",
            png.to_str().unwrap(),
        ],
    ));
    assert_eq!(read_png(&png).dimensions(), (64, 64));
}

/// Log lines without what the clock decides (the time spent drawing sample grids).
fn without_timings(log: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let mut log = log.to_vec();
    for line in &mut log {
        if let Some(obj) = line.as_object_mut() {
            obj.remove("sample_seconds");
        }
    }
    log
}

/// The settings that shape a result are fixed by the run's first segment: a resume that
/// changes one is refused before anything changes, naming the flag and both values;
/// what only watches the run may change. A finished run resumed says so and exits 0.
#[test]
fn resume_keeps_the_settings_of_the_run_and_a_finished_run_stays_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("run");
    let base = short_run_args(pair, out.to_str().unwrap(), &model);
    // Stopped after step 4: keep only what existed then.
    ok(&train(&base));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let finished_log = log.clone();
    for f in ["step-000006.safetensors", "step-000008.safetensors"] {
        std::fs::remove_file(out.join("checkpoints").join(f)).unwrap();
    }
    for f in ["magictailor.json", "pytorch_lora_weights.safetensors"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let four: String = log.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("train_log.jsonl"), &four).unwrap();

    let resume = |more: &[&str]| train(&with_args(with_args(base.clone(), &["--resume"]), more));
    for (more, needle) in [
        (
            &["--warmup-lr", "5e-4"][..],
            "--warmup-lr (warmup_lr): 0.0005 now, 0.0001 when the run started",
        ),
        (
            &["--lora-rank", "8"][..],
            "--lora-rank (lora_rank): 8 now, 32 when",
        ),
        (&["--no-flip"][..], "--no-flip (flip): false now, true when"),
    ] {
        let o = resume(more);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(needle) && err.contains("step-000004.safetensors"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("train_log.jsonl")).unwrap(),
            four
        );
        assert!(!out.join("checkpoints/step-000005.safetensors").exists());
    }
    // Watching differently changes nothing: the run ends as it would have.
    let mut watching = with_args(base.clone(), &["--resume", "--sample-every", "0"]);
    set_arg(&mut watching, "--checkpoint-every", "2");
    ok(&train(&watching));
    let losses = |log: &str| -> Vec<(serde_json::Value, serde_json::Value)> {
        let lines = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        lines
            .map(|v| (v["step"].clone(), v["loss"].clone()))
            .collect()
    };
    let now = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(losses(&now), losses(&finished_log));
    // The record names every segment that trained, with its exact command line.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
            .unwrap();
    let segments = record["segments"].as_array().unwrap();
    let froms: Vec<u64> = segments
        .iter()
        .map(|s| s["from_step"].as_u64().unwrap())
        .collect();
    assert_eq!(froms, [0, 4], "the refused resumes trained nothing");
    let command: Vec<&str> = (segments[1]["command"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(command.ends_with(&watching), "{command:?}");
    assert_eq!(
        record["magictailor_commit"],
        segments[1]["magictailor_commit"]
    );

    let o = resume(&[]);
    ok(&o);
    let o2 = train(
        &with_args(base.clone(), &["--resume"])
            .into_iter()
            .filter(|a| *a != "--quiet")
            .collect::<Vec<_>>(),
    );
    ok(&o2);
    assert!(
        stderr(&o2).contains("is finished: all 8 steps are done"),
        "{}",
        stderr(&o2)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("train_log.jsonl")).unwrap(),
        now
    );
    let mut longer = with_args(base.clone(), &["--resume"]);
    set_arg(&mut longer, "--dsbal-steps", "6");
    let o = train(&longer);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a finished run is not extended: {}",
        stderr(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains("--dsbal-steps (dsbal_steps): 6 now, 4 when"),
        "{err}"
    );
}

/// A short run (4 + 4 steps, checkpoints at 3, 4, 6 and 8) trained into `TMP/run`.
fn short_trained_run() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny_sd();
    ok(&train(&short_run_args(
        pair.to_str().unwrap(),
        out.to_str().unwrap(),
        &model,
    )));
    (tmp, out)
}

/// The record names the pair and the output folder by absolute path, wherever `train`
/// ran from.
#[test]
fn the_record_holds_absolute_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let model = tiny_sd();
    let name = pair.file_name().unwrap().to_str().unwrap();
    let args = with_args(
        quiet_train_args(name, "out", &model),
        &["--warmup-steps", "1", "--dsbal-steps", "1"],
    );
    let o = bin_command("train", &args)
        .current_dir(pair.parent().unwrap())
        .output()
        .unwrap();
    ok(&o);
    let out = tmp.path().join("out");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
            .unwrap();
    let recorded = std::path::PathBuf::from(record["config"]["instance_dir"].as_str().unwrap());
    assert!(recorded.is_absolute() && recorded.is_dir(), "{recorded:?}");
    assert_eq!(
        recorded.canonicalize().unwrap(),
        pair.canonicalize().unwrap()
    );
}

/// `--keep-checkpoints N` keeps the newest N as the run goes, and changes nothing else.
#[test]
fn keep_checkpoints_prunes_old_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("run");
    let mut args = short_run_args(pair, out.to_str().unwrap(), &model);
    set_arg(&mut args, "--checkpoint-every", "1");
    ok(&train(&with_args(args, &["--keep-checkpoints", "2"])));
    let mut left: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["step-000007.safetensors", "step-000008.safetensors"]);
    let o = run_bin(
        "train",
        &["--instance-dir", pair, "--keep-checkpoints", "0"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `infer --checkpoint` samples a checkpoint of a run, finished or not: the last one
/// draws what the finished run draws; a missing one is named with those there are.
#[test]
fn checkpoints_can_be_sampled() {
    let (tmp, out) = short_trained_run();
    let out_s = out.to_str().unwrap();
    let draw = |extra: &[&str], name: &str| {
        let png = tmp.path().join(name);
        let base = [
            "--model-dir",
            out_s,
            "--prompt",
            "<v0> with <v1>",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--quiet",
            "--out",
            png.to_str().unwrap(),
        ];
        let o = run_bin("infer", &[&base[..], extra].concat());
        (o, png)
    };
    let (o, last) = draw(&["--checkpoint", "step-8"], "last.png");
    ok(&o);
    let (o, finished) = draw(&[], "finished.png");
    ok(&o);
    assert_eq!(
        read_png(&last),
        read_png(&finished),
        "step 8 is the finished run"
    );

    std::fs::remove_file(out.join("magictailor.json")).unwrap();
    let (o, early) = draw(&["--checkpoint", "3"], "early.png");
    ok(&o);
    assert_ne!(read_png(&early), read_png(&finished));
    let (o, _) = draw(&["--checkpoint", "5"], "none.png");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("has checkpoints at steps [3, 4, 6, 8]"),
        "{err}"
    );
}

/// `magictailor info` says what a run folder holds, finished or not; `completions`
/// prints a shell's completion script.
#[test]
fn info_describes_a_run_folder() {
    let (tmp, out) = short_trained_run();
    let out_s = out.to_str().unwrap();
    let o = run_bin("info", &[out_s, "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(
        (v["steps_done"].as_u64(), v["total_steps"].as_u64()),
        (Some(8), Some(8))
    );
    assert_eq!(v["checkpoints"], serde_json::json!([3, 4, 6, 8]));
    assert_eq!(v["tokens"]["<v1>"], "hair");
    assert!(v["files"]
        .to_string()
        .contains("pytorch_lora_weights.safetensors"));
    assert_eq!(v["segments"].as_array().unwrap().len(), 1);

    std::fs::remove_file(out.join("magictailor.json")).unwrap();
    let o = run_bin("info", &[out_s]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("steps:       8 of 8 (unfinished"), "{text}");
    let o = run_bin("info", &[tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "no run there");

    let o = run_bin("completions", &["bash"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("_magictailor()"));
}

/// `--config`: a run's magictailor.json redoes it (the same weights, bit for bit, in
/// another folder); a TOML file of flags sets what the command line does not.
#[test]
fn a_run_record_reads_back_as_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let (first, again) = (tmp.path().join("first"), tmp.path().join("again"));
    let args = with_args(
        quiet_train_args(pair, first.to_str().unwrap(), &model),
        &[
            "--warmup-steps",
            "2",
            "--dsbal-steps",
            "2",
            "--no-flip",
            "--lora-rank",
            "4",
            "--seed",
            "7",
        ],
    );
    ok(&train(&args));
    let record = first.join("magictailor.json");
    let redo = [
        "--config",
        record.to_str().unwrap(),
        "--out-dir",
        again.to_str().unwrap(),
        "--quiet",
    ];
    ok(&train(&redo));
    assert!(
        trained_weights(&first) == trained_weights(&again),
        "the same run again"
    );
    let config = |dir: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("magictailor.json")).unwrap())
                .unwrap();
        let mut c = v["config"].clone();
        c.as_object_mut().unwrap().remove("output_dir");
        c
    };
    assert_eq!(config(&first), config(&again));

    let toml = tmp.path().join("run.toml");
    let text = format!(
        "instance-dir = {pair:?}\nmodel = {model:?}\nresolution = 64\nwarmup-steps = 3\n\
         dsbal-steps = 1\nlora-rank = 4\n"
    );
    std::fs::write(&toml, text).unwrap();
    let third = tmp.path().join("third");
    let cli = [
        "--config",
        toml.to_str().unwrap(),
        "--out-dir",
        third.to_str().unwrap(),
        "--warmup-steps",
        "1",
        "--quiet",
    ];
    ok(&train(&cli));
    let c = config(&third);
    assert_eq!(
        (c["warmup_steps"].as_u64(), c["dsbal_steps"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (c["lora_rank"].as_u64(), c["lora_alpha"].as_f64()),
        (Some(4), Some(4.0))
    );
    std::fs::write(&toml, "lora-rnak = 4\n").unwrap();
    let o = train(&["--config", toml.to_str().unwrap(), "--instance-dir", pair]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\"lora_rnak\" is not a training setting"),
        "{}",
        stderr(&o)
    );
}
