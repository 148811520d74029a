//! `train --method break-a-scene` on the tiny fixture model: phase 1 trains only the
//! words, phase 2 every U-Net and text-encoder weight (or adapters with `--phase2-lora`);
//! what it writes and how `infer` reads it back; resume inside either phase; the step
//! against the source's step written in torch (scripts/make_bas_fixture.py).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::model::loader::StableDiffusion;

const DELTA: &str = "full_weights_delta.safetensors";
const EMBEDS: &str = "learned_embeds.safetensors";

/// 2 + 2 steps at 64 px with two class images, a checkpoint after every step.
fn bas_args<'a>(pair: &'a str, out: &'a Path, model: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let steps = [
        "--method",
        "break-a-scene",
        "--phase1-steps",
        "2",
        "--phase2-steps",
        "2",
        "--phase1-lr",
        "5e-3",
        "--class-images",
        "2",
        "--checkpoint-every",
        "1",
    ];
    let args = with_args(quiet_train_args(pair, out.to_str().unwrap(), model), &steps);
    with_args(args, more)
}

fn load(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

fn checkpoint(out: &Path, step: usize) -> HashMap<String, Tensor> {
    load(&out.join(format!("checkpoints/step-{step:06}.safetensors")))
}

/// `infer` at 64 px, 3 steps, into `png`; its pixels.
fn draw(extra: &[&str], prompt: &str, png: &Path) -> image::RgbImage {
    let mut a = vec!["--prompt", prompt, "--width", "64", "--height", "64"];
    a.extend(["--steps", "3", "--quiet", "--out", png.to_str().unwrap()]);
    a.extend(extra);
    ok(&run_bin("infer", &a));
    read_png(png)
}

/// A full run: the phases and rates in the log, prior preservation on the source's
/// beach images, the words alone moving in phase 1 and every weight in phase 2; the
/// folder writes only the changes, which `infer` adds to the base exactly as the run's
/// last checkpoint holds them; a run killed inside phase 2 or at the switch resumes to
/// the same files byte for byte; `--export-full` writes whole diffusers folders.
#[test]
fn break_a_scene_trains_the_words_then_every_weight_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("bas");
    let full = tmp.path().join("full");
    let export = ["--export-full", full.to_str().unwrap()];
    ok(&run_bin("train", &bas_args(pair, &out, &model, &export)));

    let log = read_log(&out);
    let phases: Vec<&str> = log.iter().map(|l| l["phase"].as_str().unwrap()).collect();
    assert_eq!(
        phases,
        ["bas-tokens", "bas-tokens", "bas-weights", "bas-weights"]
    );
    let lrs: Vec<f64> = log.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [5e-3, 5e-3, 2e-6, 2e-6]);
    for l in &log {
        assert!(l["l_prior"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["l_attn"].as_f64().unwrap() > 0.0, "{l}");
    }
    let class = out.join("class_images/a photo at the beach");
    assert!(class.join("0000.png").is_file() && class.join("0001.png").is_file());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
            .unwrap();
    let m = &record["method"];
    assert_eq!(m["name"], "break-a-scene");
    assert_eq!(m["trains"]["every_unet_and_text_encoder_weight"], true);
    assert_eq!(m["prior_preservation"]["prompt"], "a photo at the beach");
    assert_eq!(m["prior_preservation"]["per_step"], 1);
    assert_eq!(m["loss_weights"]["l_attn_over_words"], "sum");
    assert_eq!(
        m["trains_weights_in_phases"],
        serde_json::json!(["bas-weights"])
    );

    // Phase 1 moves only the rows; the full weights exist from phase 2's first step.
    let (c1, c2, c3) = (
        checkpoint(&out, 1),
        checkpoint(&out, 2),
        checkpoint(&out, 3),
    );
    assert!(
        c2.keys().all(|k| !k.starts_with("full.")),
        "no full weights in phase 1"
    );
    assert!(
        max_abs_diff(&c1["rows"], &c2["rows"]) > 0.0,
        "the rows train in phase 1"
    );
    let full_keys = c3.keys().filter(|k| k.starts_with("full.")).count();
    assert!(full_keys > 100, "{full_keys} full tensors in phase 2");

    // The delta holds U-Net and text-encoder changes, no base copy; nothing else trains.
    let delta = load(&out.join(DELTA));
    let sd = StableDiffusion::load(&model, &Device::Cpu, DType::F32).unwrap();
    let base_unet = sd.base_unet().unwrap().0;
    let unet_keys = delta.keys().filter(|k| k.starts_with("unet.")).count();
    let text_keys = delta
        .keys()
        .filter(|k| k.starts_with("text_encoder."))
        .count();
    assert!(
        unet_keys > base_unet.len() / 2,
        "{unet_keys} of {}",
        base_unet.len()
    );
    assert!(text_keys > 10, "{text_keys} text-encoder tensors changed");
    for (k, d) in &delta {
        assert!(max_abs(d) > 0.0, "{k} is an all-zero delta");
        assert!(
            max_abs(d) < 1e-3,
            "{k} moved {} at lr 2e-6 in 2 steps",
            max_abs(d)
        );
    }
    for f in ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"] {
        assert!(
            !out.join(f).exists(),
            "{f}: a full fine-tune trains no adapters"
        );
    }

    // `infer` on the folder = the base with the delta and words = the last checkpoint; the
    // words alone draw something else.
    let (dir, prompt) = (out.to_str().unwrap(), "a photo of <v0> and <v1>");
    let (delta_file, embeds) = (out.join(DELTA), out.join(EMBEDS));
    let png = |n: &str| tmp.path().join(n);
    let folder = draw(&["--model-dir", dir], prompt, &png("dir.png"));
    let files = [
        "--model",
        &model,
        "--full-delta",
        delta_file.to_str().unwrap(),
        "--embeds",
        embeds.to_str().unwrap(),
    ];
    assert_eq!(
        png_max_diff(&folder, &draw(&files, prompt, &png("files.png"))),
        0
    );
    let last = draw(
        &["--model-dir", dir, "--checkpoint", "4"],
        prompt,
        &png("last.png"),
    );
    assert_eq!(png_max_diff(&folder, &last), 0);
    let words = ["--model", &model, "--embeds", embeds.to_str().unwrap()];
    assert!(png_max_diff(&folder, &draw(&words, prompt, &png("words.png"))) > 0);

    // --export-full: whole folders with the trained weights.
    let unet = load(&full.join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(unet.len(), base_unet.len());
    for (k, v) in &unet {
        let want = match delta.get(&format!("unet.{k}")) {
            Some(d) => (&base_unet[k] + d).unwrap(),
            None => base_unet[k].clone(),
        };
        assert!(max_abs_diff(v, &want) < 1e-7, "{k}");
    }
    assert!(full.join("unet/config.json").is_file());
    assert!(full.join("text_encoder/model.safetensors").is_file());
    assert!(full.join("text_encoder/config.json").is_file());
    // For scripts/check_rust_exports.py, which draws it with diffusers from these folders.
    let check = leave_check(&out, "break-a-scene-check", "<v0> with <v1>");
    copy_dir(&full, &check.join("full"));

    // Killed at the switch (step 2) or inside phase 2 (step 3): the same files.
    for step in [2, 3] {
        let killed = tmp.path().join(format!("killed-{step}"));
        std::fs::create_dir_all(killed.join("checkpoints")).unwrap();
        let name = format!("checkpoints/step-{step:06}.safetensors");
        std::fs::copy(out.join(&name), killed.join(&name)).unwrap();
        // The class images are reused, not drawn again.
        copy_dir(&out.join("class_images"), &killed.join("class_images"));
        let mut args = bas_args(pair, &killed, &model, &[]);
        args.push("--resume");
        ok(&run_bin("train", &args));
        for f in [DELTA, EMBEDS] {
            assert_eq!(
                read_bytes(&killed.join(f)),
                read_bytes(&out.join(f)),
                "{f}, step {step}"
            );
        }
    }
}

/// `--phase2-lora`: phase 2 trains U-Net adapters (and the words) at DreamBooth-LoRA's
/// rate; the adapters stay zero through phase 1; no full weights are made or written.
#[test]
fn break_a_scene_with_phase2_lora_trains_adapters_instead() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("bas-lora");
    let more = ["--phase2-lora", "4", "--no-prior-preservation"];
    ok(&run_bin(
        "train",
        &bas_args_without_class(pair, &out, &model, &more),
    ));
    let log = read_log(&out);
    let lrs: Vec<f64> = log.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [5e-3, 5e-3, 1e-4, 1e-4]);
    assert!(log.iter().all(|l| l.get("l_prior").is_none()));
    let (c2, c4) = (checkpoint(&out, 2), checkpoint(&out, 4));
    let b_max = |c: &HashMap<String, Tensor>| {
        (c.iter()
            .filter(|(k, _)| k.starts_with("lora.") && k.ends_with(".B")))
        .map(|(_, v)| max_abs(v))
        .fold(0f32, f32::max)
    };
    assert_eq!(b_max(&c2), 0.0, "adapters do not train in phase 1");
    assert!(b_max(&c4) > 0.0, "adapters train in phase 2");
    assert!(c4.keys().all(|k| !k.starts_with("full.")));
    assert!(out.join("pytorch_lora_weights.safetensors").is_file());
    assert!(!out.join(DELTA).exists());
    assert!(!out.join("class_images").exists());
}

fn bas_args_without_class<'a>(
    pair: &'a str,
    out: &'a Path,
    model: &'a str,
    more: &[&'a str],
) -> Vec<&'a str> {
    let mut a = bas_args(pair, out, model, more);
    let at = a.iter().position(|&x| x == "--class-images").unwrap();
    a.drain(at..at + 2);
    a
}

/// Flags that do not fit Break-A-Scene, or that it does not read, are refused by name
/// before anything is loaded.
#[test]
fn break_a_scene_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    let export = tmp.path().join("full");
    let export = export.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--method", "ti", "--phase2-lora", "4"],
            "--method ti: --phase2-lora",
        ),
        (
            &["--method", "break-a-scene", "--prior-preservation"],
            "--method break-a-scene: --prior-preservation",
        ),
        (
            &["--method", "break-a-scene", "--steps", "3"],
            "--phase1-steps/--phase2-steps",
        ),
        (
            &[
                "--method",
                "break-a-scene",
                "--no-prior-preservation",
                "--class-images",
                "3",
            ],
            "drop --no-prior-preservation",
        ),
        (
            &[
                "--method",
                "break-a-scene",
                "--phase1-steps",
                "0",
                "--phase2-steps",
                "0",
            ],
            "nothing to train",
        ),
        (
            &["--method", "break-a-scene", "--phase2-lr", "-1"],
            "--phase2-lr -1",
        ),
        (
            &[
                "--method",
                "break-a-scene",
                "--phase2-lora",
                "4",
                "--export-full",
                export,
            ],
            "with --phase2-lora nothing is fine-tuned in full",
        ),
    ];
    for (more, needle) in cases {
        let a = with_args(quiet_train_args(pair, o, &model), more);
        let r = run_bin("train", &a);
        assert!(!r.status.success(), "{more:?} was accepted");
        assert!(stderr(&r).contains(needle), "{more:?}: {}", stderr(&r));
        assert!(!out.exists(), "{more:?} wrote into the output folder");
    }
}

/// One phase-2 step (two images, each with its own word, and a beach class image)
/// against the same step in torch with every weight trainable: the three loss terms, and
/// the gradient of every U-Net and text-encoder tensor and of the rows.
#[test]
fn a_break_a_scene_step_matches_torch() {
    use magictailor::model::full::FullWeights;
    use magictailor::train::method::LossWeights;
    use magictailor::train::objective::{
        step_losses, Batch, Finetuned, Noised, Online, TextParams,
    };

    let dev = Device::Cpu;
    let fixture = load(&fixtures().join("bas_step.safetensors"));
    let get = |k: &str| {
        fixture
            .get(&format!("bas.{k}"))
            .unwrap_or_else(|| panic!("the fixture lacks bas.{k}"))
            .clone()
    };
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F32).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();
    let prompts = ["a photo of <v0>", "a photo of <v1>", "a photo at the beach"];
    let ids: Vec<Vec<u32>> = (prompts.iter())
        .map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    let want: Vec<Vec<i64>> = get("ids").to_vec2().unwrap();
    for (got, want) in ids.iter().zip(&want) {
        assert!(
            got.iter().zip(want).all(|(a, b)| *a as i64 == *b),
            "{got:?}"
        );
    }
    let token_pos: Vec<usize> = (0..2)
        .map(|s| {
            let word = sd.tokenizer.encode(&format!("<v{s}>")).unwrap()[1];
            ids[s].iter().position(|&i| i == word).unwrap()
        })
        .chain([0])
        .collect();
    let batch = Batch {
        pixels: Tensor::zeros(1, DType::F32, &dev).unwrap(),
        masks: get("masks"),
        ids: Tensor::from_vec(ids.concat(), (3, 77), &dev).unwrap(),
        ids_2: None,
        token_pos,
        sample_of: vec![0, 1, 0],
        n_samples: 2,
        roi: None,
        prior: 1,
        reference: None,
        posterior: None,
    };
    let t: Vec<i64> = get("t").to_vec1().unwrap();
    let noised = Noised {
        z_t: get("z_t"),
        eps: get("eps"),
        target: get("eps"),
        timesteps: t.iter().map(|&x| x as usize).collect(),
        masks: get("masks"),
        reference: None,
    };
    let full = FullWeights::of(&sd).unwrap();
    let rows = candle_core::Var::from_tensor(&get("rows")).unwrap();
    let model = Finetuned::over(&full, DType::F32).unwrap();
    let lora = magictailor::model::lora::LoraSet::default();
    let online = Online {
        full: Some(&model),
        ..Online::lora(&lora)
    };
    let text = TextParams {
        rows: rows.as_tensor(),
        table: Some(full.token_table().as_tensor()),
        rows_2: None,
        table_2: None,
    };
    let w = LossWeights {
        lambda_attn: 0.01,
        prior: 1.0,
        attn_summed: true,
        ..LossWeights::default()
    };
    let l = step_losses(&sd, &batch, &noised, online, text, None, w).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    let terms = [
        ("loss", scalar(&l.loss)),
        ("l_diff", scalar(&l.l_diff)),
        ("l_prior", scalar(l.l_prior.as_ref().unwrap())),
        ("l_attn", scalar(&l.l_attn)),
    ];
    for (name, got) in terms {
        let want = scalar(&get(name));
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name} {got} vs {want}"
        );
    }
    let grads = l.loss.backward().unwrap();
    let mut worst = (0f32, String::new());
    let mut checked = 0;
    for (name, var) in full
        .named()
        .into_iter()
        .chain([("rows".into(), rows.clone())])
    {
        let want = match name.as_str() {
            "rows" => get("grad.rows"),
            _ => match fixture.get(&format!("bas.grad.{name}")) {
                Some(g) => g.clone(),
                None => panic!("the fixture has no gradient of {name}"),
            },
        };
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient of {name}"));
        // Gradients that are zero in exact arithmetic (a key bias shifts every score of a
        // query alike; a 1x1 self-attention has one key) are 1e-10 noise on both sides.
        let err = max_abs_diff(got, &want) / max_abs(&want).max(1e-5);
        if err > worst.0 {
            worst = (err, name.clone());
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked} tensors checked");
    assert!(
        worst.0 < 1e-4,
        "worst relative gradient error {} at {}",
        worst.0,
        worst.1
    );
}
