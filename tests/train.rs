//! `magictailor train` on the tiny fixture model: learning happens, resume is exact,
//! the output folder feeds `infer`, and bad input leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use common::*;
use image::{ImageBuffer, Luma, Rgb};
use magictailor::train::{trainer::Trainer, TrainConfig};

/// person_k+hair_c: a disc on a background per image, the disc as mask.
fn make_pair(root: &Path) -> PathBuf {
    let dir = root.join("person_k+hair_c");
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for (s, name, col) in [
        (0, "person_k", [200u8, 150, 120]),
        (1, "hair_c", [40, 30, 20]),
    ] {
        for k in 1..=2u32 {
            let inside =
                |x: u32, y: u32| (x as i32 - 40 - k as i32).pow(2) + (y as i32 - 32).pow(2) < 400;
            let img = ImageBuffer::from_fn(80, 64, |x, y| {
                if inside(x, y) {
                    Rgb(col)
                } else {
                    Rgb([90, 140, 200])
                }
            });
            img.save(dir.join(format!("{s}_{name}{k}.png"))).unwrap();
            let m =
                ImageBuffer::from_fn(80, 64, |x, y| Luma([if inside(x, y) { 255u8 } else { 0 }]));
            m.save(dir.join(format!("masks/{s}_{name}{k}.png")))
                .unwrap();
        }
    }
    dir
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
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
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

fn train(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

fn train_args<'a>(pair: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--instance-dir",
        pair,
        "--output-dir",
        out,
        "--model",
        tiny_model(),
        "--resolution",
        "64",
        "--warmup-steps",
        "4",
        "--dsbal-steps",
        "4",
        "--checkpoint-every",
        "3",
        "--quiet",
    ]
}

fn tiny_model() -> &'static str {
    Box::leak(tiny_sd().into_boxed_str())
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn resume_after_a_kill_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let pair = pair.to_str().unwrap();
    let full = tmp.path().join("full");
    ok(&train(&train_args(pair, full.to_str().unwrap())));
    let ckpts: Vec<String> = std::fs::read_dir(full.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut ckpts = ckpts;
    ckpts.sort();
    // Every 3 steps, plus the switch to DS-Bal after step 4.
    assert_eq!(
        ckpts,
        [
            "step-000003.safetensors",
            "step-000004.safetensors",
            "step-000006.safetensors"
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
        let mut args = train_args(pair, run.to_str().unwrap());
        args.push("--resume");
        ok(&train(&args));
        for f in [
            "pytorch_lora_weights.safetensors",
            "learned_embeds.safetensors",
        ] {
            assert!(
                read(&run.join(f)) == read(&full.join(f)),
                "{f} differs after resuming from step {kill_at}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(run.join("train_log.jsonl")).unwrap(),
            log,
            "log continues seamlessly"
        );
    }
}

#[test]
fn a_trained_folder_feeds_infer_and_logs_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    ok(&train(&train_args(
        pair.to_str().unwrap(),
        out.to_str().unwrap(),
    )));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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

    let infer = |extra: &[&str], png: &Path| {
        let mut a = vec![
            "infer",
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
        Command::new(bin())
            .args(&a)
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
            &tiny_sd(),
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

#[test]
fn half_precision_training_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let run = |dtype: DType, loss_scale: Option<f64>| {
        let mut cfg = config(&pair, &tmp.path().join("unused"), 2, 2);
        (cfg.dtype, cfg.loss_scale) = (dtype, loss_scale);
        let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
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

#[test]
fn bad_training_input_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let pair = pair.to_str().unwrap();
    let out = tmp.path().join("never");
    let o = out.to_str().unwrap();
    let refused = |args: Vec<&str>, needle: &str| {
        let r = train(&args);
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(
            !r.status.success() && err.contains(needle) && !err.contains("panicked"),
            "{needle}: {err}"
        );
        assert!(!out.exists(), "no output folder for bad input ({needle})");
    };
    let with = |extra: &[&'static str]| {
        let mut a = vec![
            "--instance-dir",
            pair,
            "--output-dir",
            o,
            "--model",
            tiny_model(),
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
    a[7] = "60";
    refused(a, "multiple of 8");
    let lonely = tmp.path().join("person_k");
    std::fs::create_dir(&lonely).unwrap();
    let mut a = with(&[]);
    a[1] = lonely.to_str().unwrap();
    refused(a, "person_k+hair_c");
    std::fs::remove_file(Path::new(pair).join("masks/1_hair_c2.png")).unwrap();
    refused(with(&[]), "1_hair_c2.png has no mask");
    // An existing run is never overwritten without --resume.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let r = train(&with(&["--no-masks"]));
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("--resume"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn released_script_switch_reproduces_its_three_departures() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let run = |released: bool| {
        let mut cfg = config(&pair, &tmp.path().join("unused"), 2, 3);
        cfg.released_script = released;
        let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
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
        .batch
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
