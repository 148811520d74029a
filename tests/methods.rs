//! `train --method`: the comparison methods on the tiny fixture model. What each trains
//! (and what it leaves bit-identical), what it writes, its log and record, resume, the
//! step's draw, and the refusal of another method's flags.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use magictailor::io::progress::Progress;
use magictailor::model::loader::StableDiffusion;
use magictailor::train::method::{Method, TI_TEMPLATES};
use magictailor::train::{trainer::Trainer, TrainConfig};

/// `train --method ti` at 64 px, 4 steps of 3 images, a checkpoint every 2, JSON log.
fn ti_args<'a>(pair: &'a str, out: &'a str, model: &'a str) -> Vec<&'a str> {
    let more = [
        "--method",
        "ti",
        "--steps",
        "4",
        "--images-per-step",
        "3",
        "--checkpoint-every",
        "2",
    ];
    with_args(quiet_train_args(pair, out, model), &more)
}

fn record(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("magictailor.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The embedding of the first token of `word` in the tiny model's table.
fn class_row(word: &str) -> Vec<f32> {
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let id = sd.tokenizer.encode(word).unwrap()[1];
    let row = sd.text_encoder.token_row(id).unwrap();
    row.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn textual_inversion_trains_only_the_words_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let pair = pair.to_str().unwrap();
    let model = tiny_sd();
    let out = tmp.path().join("ti");
    ok(&run_bin(
        "train",
        &ti_args(pair, out.to_str().unwrap(), &model),
    ));

    // One phase, the rate scaled by the images per step, no adapters.
    let log = read_log(&out);
    assert_eq!(log.len(), 4);
    for l in &log {
        assert_eq!(l["phase"], "ti");
        assert!(
            (l["lr"].as_f64().unwrap() - 3.0 * 5e-4).abs() < 1e-15,
            "{l}"
        );
        assert_eq!(l["l_attn"], 0.0);
        assert_eq!(l["l_pres"], 0.0);
        assert!(
            l["grad_norm"].as_f64().unwrap() > 0.0,
            "the rows' gradient: {l}"
        );
    }
    for f in ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"] {
        assert!(
            !out.join(f).exists(),
            "TI trains no adapters, yet {f} exists"
        );
    }
    let r = record(&out);
    assert_eq!(r["method"]["name"], "ti");
    assert!(r["method"]["trains"]["lora"].is_null());
    assert_eq!(r["method"]["phases"][0]["steps"], 4);
    assert_eq!(r["method"]["images_per_step"], 3);
    assert_eq!(r["config"]["method"], "ti");

    // The words moved away from their class words' rows.
    let embeds = out.join("learned_embeds.safetensors");
    let words = magictailor::io::embeds::load(&embeds, 32, &Device::Cpu).unwrap();
    for ((word, row), class) in words.iter().zip(["person", "hair"]) {
        let row: Vec<f32> = row.to_vec1().unwrap();
        let start = class_row(class);
        let moved = row.iter().zip(&start).map(|(a, b)| (a - b).abs());
        assert!(moved.fold(0f32, f32::max) > 1e-4, "{word} did not train");
    }

    // `infer` on the folder is the base model with the words, bit for bit.
    let png = |name: &str| tmp.path().join(name);
    let draw = |extra: &[&str], out_png: &Path| {
        let mut a = vec![
            "--prompt",
            "a photo of <v0>",
            "--width",
            "64",
            "--height",
            "64",
        ];
        a.extend([
            "--steps",
            "3",
            "--quiet",
            "--out",
            out_png.to_str().unwrap(),
        ]);
        a.extend(extra);
        ok(&run_bin("infer", &a));
    };
    draw(&["--model-dir", out.to_str().unwrap()], &png("dir.png"));
    draw(
        &["--model", &model, "--embeds", embeds.to_str().unwrap()],
        &png("words.png"),
    );
    assert_eq!(read_bytes(&png("dir.png")), read_bytes(&png("words.png")));
    // A checkpoint holds the rows and no adapters.
    let dir = out.to_str().unwrap();
    draw(
        &["--model-dir", dir, "--checkpoint", "2"],
        &png("step2.png"),
    );
    // The image says which checkpoint drew it.
    let made: serde_json::Value =
        serde_json::from_str(&png_text(&png("step2.png"))["magictailor"]).unwrap();
    let file = made["checkpoint"].as_str().unwrap_or_default();
    assert!(
        file.ends_with(".safetensors") && file.contains('2'),
        "{made}"
    );
    assert!(png_text(&png("step2.png"))["parameters"].contains(", Checkpoint: "));
    assert!(png_text(&png("dir.png"))["magictailor"]
        .find("checkpoint")
        .is_none());

    // Leave the A1111 files and an image from fixed latents for
    // scripts/check_rust_exports.py, which loads the files into diffusers
    // (`load_textual_inversion(file, token=...)`) and must draw the same image.
    let check = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ti-check");
    let _ = std::fs::remove_dir_all(&check);
    copy_dir(&out.join("embeddings"), &check.join("embeddings"));
    let latents = fixtures().join("init_latents.safetensors");
    let png = check.join("infer.png");
    let a = [
        "--model-dir",
        dir,
        "--prompt",
        "a photo of <v0> with <v1>",
        "--init-latents",
        latents.to_str().unwrap(),
        "--steps",
        "10",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        png.to_str().unwrap(),
    ];
    ok(&run_bin("infer", &a));

    // Killed after step 2: the resumed run ends with the same words and losses.
    let killed = tmp.path().join("killed");
    std::fs::create_dir_all(killed.join("checkpoints")).unwrap();
    let first = "step-000002.safetensors";
    std::fs::copy(
        out.join("checkpoints").join(first),
        killed.join("checkpoints").join(first),
    )
    .unwrap();
    let mut args = ti_args(pair, killed.to_str().unwrap(), &model);
    args.push("--resume");
    ok(&run_bin("train", &args));
    assert_eq!(
        read_bytes(&killed.join("learned_embeds.safetensors")),
        read_bytes(&embeds)
    );
    let steps = |run: &Path| -> Vec<(f64, f64)> {
        (read_log(run).iter())
            .map(|l| (l["step"].as_f64().unwrap(), l["loss"].as_f64().unwrap()))
            .collect()
    };
    // The killed folder kept no log: it holds the resumed steps 3 and 4.
    assert_eq!(steps(&killed), steps(&out)[2..]);
}

/// A step draws its images and templates from (seed, step) alone; each prompt holds
/// its own image's pseudo-word where the batch says.
#[test]
fn a_textual_inversion_step_draws_images_and_templates_by_seed_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let mut cfg = TrainConfig::new(pair, tmp.path().join("out"), tiny_sd());
    (cfg.method, cfg.resolution, cfg.steps) = (Method::Ti, 64, Some(10));
    let t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    let batch = |d: usize| {
        let b = t.pool.batch(&t.sd, &t.recipe.draw, 0, d).unwrap();
        let ids: Vec<Vec<u32>> = b.ids.to_vec2().unwrap();
        (b.sample_of.clone(), b.token_pos.clone(), ids)
    };
    let word_ids: Vec<u32> = ["<v0>", "<v1>"]
        .iter()
        .map(|w| t.sd.tokenizer.encode(w).unwrap()[1])
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for d in 1..=10 {
        let (samples, pos, ids) = batch(d);
        assert_eq!(samples.len(), 4, "diffusers' 1 x 4 accumulated");
        assert_eq!((samples.clone(), pos.clone(), ids.clone()), batch(d));
        for ((s, p), ids) in samples.iter().zip(&pos).zip(&ids) {
            assert_eq!(ids[*p], word_ids[*s], "step {d}: the image's own word");
            seen.insert(ids[..*p].to_vec());
        }
    }
    assert_ne!(batch(1), batch(2), "each step draws anew");
    // Templates put different words before the pseudo-word.
    assert!(
        seen.len() > 5,
        "only {} prompt openings in 40 draws",
        seen.len()
    );
    assert_eq!(TI_TEMPLATES.len(), 27);
}

/// A Custom Diffusion step draws two rescaled images: a shrunk one is prompted "a far
/// away" or "very small", an enlarged one "zoomed in" or "close up"; a shrunk image's
/// mask is empty along the canvas's edges (the valid region stops a latent cell inside
/// the image), an enlarged one's is not cut.
#[test]
fn a_custom_diffusion_step_rescales_and_prompts_by_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let mut cfg = TrainConfig::new(pair, tmp.path().join("out"), tiny_sd());
    (cfg.method, cfg.resolution) = (Method::CustomDiffusion, 64);
    let t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    let word = t.sd.tokenizer.encode("<v0>").unwrap()[1];
    // A prompt's ids before its word.
    let opening = |prefix: &str| {
        let ids =
            t.sd.tokenizer
                .encode(&format!("{prefix}photo of a <v0>"))
                .unwrap();
        ids[..ids.iter().position(|&i| i == word).unwrap()].to_vec()
    };
    let kinds = [
        ("shrunk", ["a far away ", "very small "]),
        ("enlarged", ["zoomed in ", "close up "]),
        ("same", ["", ""]),
    ];
    let mut count = std::collections::BTreeMap::new();
    for d in 1..=30 {
        let b = t.pool.batch(&t.sd, &t.recipe.draw, 0, d).unwrap();
        assert_eq!(b.len(), 2);
        let ids: Vec<Vec<u32>> = b.ids.to_vec2().unwrap();
        for (j, ids) in ids.iter().enumerate() {
            let head = &ids[..b.token_pos[j]];
            let kind = (kinds.iter())
                .find(|(_, p)| p.iter().any(|p| opening(p) == head))
                .unwrap_or_else(|| panic!("step {d}: unexpected prompt {head:?}"))
                .0;
            *count.entry(kind).or_insert(0) += 1;
            let mask = b.masks.get(j).unwrap().squeeze(0).unwrap();
            let rim: f32 = [mask.get(0).unwrap(), mask.get(63).unwrap()]
                .iter()
                .map(|r| r.sum_all().unwrap().to_scalar::<f32>().unwrap())
                .sum();
            if kind == "shrunk" {
                assert_eq!(rim, 0.0, "step {d}: a shrunk image's mask reaches the edge");
            }
        }
        let again = t.pool.batch(&t.sd, &t.recipe.draw, 0, d).unwrap();
        assert_eq!(
            max_abs_diff(&again.pixels, &b.pixels),
            0.0,
            "step {d} redraws the same"
        );
    }
    assert!(
        count["shrunk"] > 5 && count["enlarged"] > 2,
        "{count:?} of 60 images"
    );
}

fn assert_refused(args: &[&str], out: &Path, needles: &[&str]) {
    let o = run_bin("train", args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    assert!(!out.exists(), "a refused run writes nothing");
}

#[test]
fn a_flag_of_another_method_is_refused_naming_the_method() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("out");
    let base = quiet_train_args(pair, out.to_str().unwrap(), &model);
    let ti = with_args(base.clone(), &["--method", "ti"]);

    let a = with_args(ti.clone(), &["--warmup-steps", "10", "--lambda-attn", "0"]);
    assert_refused(&a, &out, &["--method ti", "--warmup-steps, --lambda-attn"]);
    // Typed at its default value, a flag is still one the method would ignore.
    let a = with_args(ti.clone(), &["--lora-rank", "32"]);
    assert_refused(&a, &out, &["--method ti", "--lora-rank"]);
    let a = with_args(base.clone(), &["--steps", "5"]);
    assert_refused(&a, &out, &["--method magictailor", "--steps"]);
    let a = with_args(base.clone(), &["--images-per-step", "4"]);
    assert_refused(&a, &out, &["--method magictailor", "--images-per-step"]);
    // Custom Diffusion's own flag, and MagicTailor's jitter under CLiC (whose jitter is
    // its source's).
    let a = with_args(ti.clone(), &["--no-scale-aug"]);
    assert_refused(&a, &out, &["--method ti", "--no-scale-aug"]);
    let clic = with_args(base.clone(), &["--method", "clic", "--color-jitter", "0.2"]);
    assert_refused(&clic, &out, &["--method clic", "--color-jitter"]);

    // DreamBooth names four samples at most: refused from the folder alone, before any
    // model loads (this model does not exist).
    let mut five = PairSpec::training();
    let extra = five.samples[1].1.clone();
    for name in ["shirt_a", "hat_b", "bag_c"] {
        five.samples.push((name, extra.clone()));
    }
    let many = pair_folder(tmp.path(), &five);
    let missing = tmp.path().join("no-model").to_string_lossy().into_owned();
    let a = quiet_train_args(many.to_str().unwrap(), out.to_str().unwrap(), &missing);
    let a = with_args(a, &["--method", "dreambooth"]);
    assert_refused(
        &a,
        &out,
        &["--method dreambooth names at most 4 samples", "has 5"],
    );
    // Custom Diffusion and CLiC start rows from three words.
    for method in ["custom-diffusion", "clic"] {
        let a = quiet_train_args(many.to_str().unwrap(), out.to_str().unwrap(), &missing);
        let a = with_args(a, &["--method", method]);
        let said =
            format!("--method {method} names at most 3 samples (initial words ktn, pll, ucd)");
        assert_refused(&a, &out, &[said.as_str(), "has 5"]);
    }

    // From a settings file, by value.
    let file = tmp.path().join("ti.toml");
    std::fs::write(&file, "method = \"ti\"\nema-decay = 0.5\n").unwrap();
    let a = with_args(base.clone(), &["--config", file.to_str().unwrap()]);
    assert_refused(&a, &out, &["--method ti", "--ema-decay"]);
}

/// One TI step against diffusers' `textual_inversion.py` written out in torch
/// (scripts/make_method_fixtures.py): the rows' start, the masked loss, the rows'
/// gradient, and the rows after AdamW, where diffusers steps the whole table and then
/// restores every other row (the same update as stepping the rows alone).
#[test]
fn a_textual_inversion_step_matches_diffusers() {
    use candle_core::{Tensor, Var};
    use magictailor::model::lora::LoraSet;
    use magictailor::train::method::LossWeights;
    use magictailor::train::objective::{step_losses, Online, TextParams};
    use magictailor::train::optim::{AdamW, AdamWConfig};

    let dev = Device::Cpu;
    let step = ReferenceStep::load("ti");
    let get = |k: &str| step.get(k);
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F32).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();
    let prompts = [
        "a photo of a <v0>",
        "a rendering of a <v1>",
        "the photo of a <v0>",
        "a photo of my <v1>",
    ];
    let (batch, noised) = step.inputs(&sd, &prompts, step.usizes("sample_of"), 2);

    // The rows start at the class words' first tokens, as the trainer sets them.
    let init: Vec<candle_core::Tensor> = ["person", "hair"]
        .iter()
        .map(|w| {
            let id = sd.tokenizer.encode(w).unwrap()[1];
            sd.text_encoder.token_row(id).unwrap()
        })
        .collect();
    let rows = Var::from_tensor(&Tensor::stack(&init, 0).unwrap()).unwrap();
    assert_eq!(max_abs_diff(rows.as_tensor(), &get("rows_init")), 0.0);

    let none = LoraSet::default();
    let text = TextParams {
        rows: rows.as_tensor(),
        table: None,
        rows_2: None,
        table_2: None,
    };
    let w = LossWeights {
        lambda_attn: 0.0,
        lambda_pres: 0.0,
        clic: None,
        prior: 0.0,
        vico_reg: None,
        attn_summed: false,
    };
    let losses = step_losses(&sd, &batch, &noised, Online::lora(&none), text, None, w).unwrap();
    let loss: f32 = losses.loss.to_scalar().unwrap();
    let want: f32 = get("loss").to_scalar().unwrap();
    assert!(
        (loss - want).abs() < 1e-6 * want.abs().max(1.0),
        "loss {loss} vs {want}"
    );
    let grads = losses.loss.backward().unwrap();
    let g = grads.get(rows.as_tensor()).unwrap();
    let rel = max_abs_diff(g, &get("grad.rows")) / max_abs(&get("grad.rows"));
    assert!(
        rel < 1e-4,
        "rows' gradient off by {rel} of its largest entry"
    );

    let config = AdamWConfig {
        lr: 5e-4 * 4.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![rows.clone()], config).unwrap();
    opt.step(&grads).unwrap();
    let d = max_abs_diff(rows.as_tensor(), &get("rows_after"));
    assert!(d < 1e-6, "rows after AdamW differ by {d}");
}

/// DreamBooth-LoRA: adapters on the attention projections only, no rows; `<v0>` stands
/// for "sks person" wherever a prompt is read, so `infer` on the folder is the base model
/// with the adapters on the spelled-out prompt, byte for byte.
#[test]
fn dreambooth_trains_attention_adapters_and_names_samples_by_identifiers() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let out = tmp.path().join("db");
    let more = [
        "--method",
        "dreambooth",
        "--steps",
        "3",
        "--checkpoint-every",
        "2",
    ];
    let args = with_args(quiet_train_args(pair, out.to_str().unwrap(), &model), &more);
    ok(&run_bin("train", &args));

    let log = read_log(&out);
    assert_eq!(log.len(), 3);
    for l in &log {
        assert_eq!(l["phase"], "dreambooth");
        assert_eq!(l["lr"], 1e-4);
        assert!(l["grad_norm"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert!(!out.join("learned_embeds.safetensors").exists());
    assert!(!out.join("embeddings").exists());
    let r = record(&out);
    assert_eq!(r["method"]["name"], "dreambooth");
    assert_eq!(r["aliases"]["<v0>"], "sks person");
    assert_eq!(r["aliases"]["<v1>"], "ohwx hair");
    assert_eq!(r["method"]["trains"]["lora"]["rank"], 4);

    // Only the attention projections carry adapters, at rank 4.
    let lora = out.join("pytorch_lora_weights.safetensors");
    let t = candle_core::safetensors::load(&lora, &Device::Cpu).unwrap();
    assert!(!t.is_empty());
    for (k, v) in &t {
        let module = k.split(".lora_").next().unwrap();
        let projection = ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .any(|p| module.ends_with(&format!(".{p}")));
        assert!(projection, "{k} is not an attention projection");
        if k.contains("lora_A") {
            assert_eq!(v.dim(0).unwrap(), 4, "{k}");
        }
    }

    let png = |name: &str| tmp.path().join(name);
    let draw = |extra: &[&str], prompt: &str, out_png: &Path| {
        let mut a = vec!["--prompt", prompt, "--width", "64", "--height", "64"];
        a.extend([
            "--steps",
            "3",
            "--quiet",
            "--out",
            out_png.to_str().unwrap(),
        ]);
        a.extend(extra);
        ok(&run_bin("infer", &a));
    };
    let dir = out.to_str().unwrap();
    draw(&["--model-dir", dir], "a photo of <v0>", &png("dir.png"));
    let spelled = "a photo of sks person";
    draw(
        &["--model", &model, "--lora", lora.to_str().unwrap()],
        spelled,
        &png("spelled.png"),
    );
    // Pixels (the files' text chunks name the prompt as typed).
    let pixels = |name: &str| read_png(&png(name));
    assert_eq!(png_max_diff(&pixels("dir.png"), &pixels("spelled.png")), 0);
    // The base model alone draws something else: the adapters trained.
    draw(&["--model", &model], spelled, &png("base.png"));
    assert!(png_max_diff(&pixels("dir.png"), &pixels("base.png")) > 0);
    // A checkpoint of the finished run samples with the same names.
    draw(
        &["--model-dir", dir, "--checkpoint", "2"],
        "a photo of <v0> with <v1>",
        &png("step2.png"),
    );

    // An unfinished run (no record yet): its checkpoint carries the names.
    let unfinished = tmp.path().join("unfinished");
    std::fs::create_dir_all(unfinished.join("checkpoints")).unwrap();
    let ckpt = "checkpoints/step-000002.safetensors";
    std::fs::copy(out.join(ckpt), unfinished.join(ckpt)).unwrap();
    let u = unfinished.to_str().unwrap();
    let args = ["--model-dir", u, "--checkpoint", "2"];
    draw(&args, "a photo of <v0> with <v1>", &png("unfinished.png"));
    assert_eq!(
        png_max_diff(&pixels("step2.png"), &pixels("unfinished.png")),
        0
    );

    // `eval` reads the same names from the record.
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "{}\n<v0> on the beach\n").unwrap();
    let (clip, dino) = (fixture("tiny-clip"), fixture("tiny-dinov2"));
    let mut e = vec![
        "--model-dir",
        dir,
        "--prompts-file",
        prompts.to_str().unwrap(),
    ];
    e.extend([
        "--seeds", "0", "--steps", "2", "--width", "64", "--height", "64",
    ]);
    e.extend(["--clip-model", &clip, "--dino-model", &dino, "--json"]);
    let o = run_bin("eval", &e);
    ok(&o);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        report["protocol"]["seeds"] == serde_json::json!([0]),
        "{report}"
    );

    // Leave the adapters and an image from fixed latents for
    // scripts/check_rust_exports.py, which loads the file with diffusers'
    // `load_lora_weights` and draws "a photo of sks person".
    let check = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dreambooth-check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    std::fs::copy(&lora, check.join("pytorch_lora_weights.safetensors")).unwrap();
    let latents = fixtures().join("init_latents.safetensors");
    let fixed = [
        "--init-latents",
        latents.to_str().unwrap(),
        "--guidance",
        "7.5",
    ];
    let a = with_args(vec!["--model-dir", dir], &fixed);
    let mut a = with_args(a, &["--prompt", "a photo of <v0>", "--steps", "10"]);
    let out_png = check.join("infer.png");
    a.extend([
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        out_png.to_str().unwrap(),
    ]);
    ok(&run_bin("infer", &a));
}

/// DreamBooth with prior preservation: the base model draws each class's images once
/// (exactly what `infer` draws for "a photo of {class}" at the image's index as seed),
/// every step adds as many of them, weighed apart in `l_prior`; a resumed run reuses
/// them and ends with the same adapters; a folder drawn otherwise is refused; the flags
/// need `--prior-preservation` and a method that has it.
#[test]
fn dreambooth_prior_preservation_draws_class_images_once_and_weighs_them() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    fn db_args<'a>(pair: &'a str, out: &'a Path, model: &'a str) -> Vec<&'a str> {
        let more = [
            "--method",
            "dreambooth",
            "--steps",
            "3",
            "--checkpoint-every",
            "1",
            "--prior-preservation",
            "--class-images",
            "2",
            "--prior-loss-weight",
            "0.5",
        ];
        with_args(quiet_train_args(pair, out.to_str().unwrap(), model), &more)
    }
    let out = tmp.path().join("db");
    ok(&run_bin("train", &db_args(pair, &out, &model)));

    for l in &read_log(&out) {
        let (diff, prior) = (
            l["l_diff"].as_f64().unwrap(),
            l["l_prior"].as_f64().unwrap(),
        );
        assert!(prior > 0.0, "{l}");
        assert!(
            (l["loss"].as_f64().unwrap() - (diff + 0.5 * prior)).abs() < 1e-6,
            "{l}"
        );
    }
    let m = &record(&out)["method"]["prior_preservation"];
    assert_eq!(m["class_images_per_sample"], 2);
    assert_eq!(m["loss_weight"], 0.5);
    for class in ["person", "hair"] {
        let dir = out.join("class_images").join(class);
        for k in 0..2 {
            assert!(dir.join(format!("{k:04}.png")).is_file(), "{class} {k}");
        }
        assert!(!dir.join("0002.png").exists());
    }
    // A class image is `infer`'s image of its prompt and seed, pixel for pixel.
    let png = tmp.path().join("person1.png");
    let a = [
        "--model",
        &model,
        "--prompt",
        "a photo of person",
        "--seed",
        "1",
        "--steps",
        "50",
        "--guidance",
        "7.5",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        png.to_str().unwrap(),
    ];
    ok(&run_bin("infer", &a));
    let drawn = read_png(&out.join("class_images/person/0001.png"));
    assert_eq!(png_max_diff(&drawn, &read_png(&png)), 0);

    // Resumed after step 1: the class images are reused, not redrawn, and the run ends the same.
    let killed = tmp.path().join("killed");
    std::fs::create_dir_all(killed.join("checkpoints")).unwrap();
    let first = "checkpoints/step-000001.safetensors";
    std::fs::copy(out.join(first), killed.join(first)).unwrap();
    copy_dir(&out.join("class_images"), &killed.join("class_images"));
    let marker = killed.join("class_images/person/0000.png");
    std::fs::write(
        &marker,
        read_bytes(&out.join("class_images/person/0000.png")),
    )
    .unwrap();
    let before = std::fs::metadata(&marker).unwrap().modified().unwrap();
    let mut args = db_args(pair, &killed, &model);
    args.push("--resume");
    ok(&run_bin("train", &args));
    assert_eq!(
        std::fs::metadata(&marker).unwrap().modified().unwrap(),
        before
    );
    let lora = "pytorch_lora_weights.safetensors";
    assert_eq!(read_bytes(&killed.join(lora)), read_bytes(&out.join(lora)));

    // A class folder drawn at another resolution is refused, naming it.
    let other = tmp.path().join("other");
    let class_dir = out.join("class_images");
    let mut a = db_args(pair, &other, &model);
    a.extend(["--class-dir", class_dir.to_str().unwrap()]);
    set_arg(&mut a, "--resolution", "32");
    assert_refused(
        &a,
        &other,
        &["holds class images drawn otherwise", "--class-dir"],
    );
    // The flags need --prior-preservation, and a method that has it.
    let base = quiet_train_args(pair, other.to_str().unwrap(), &model);
    let a = with_args(
        base.clone(),
        &["--method", "dreambooth", "--class-images", "5"],
    );
    assert_refused(
        &a,
        &other,
        &["--class-images only shapes prior preservation"],
    );
    let a = with_args(base, &["--method", "ti", "--prior-preservation"]);
    assert_refused(&a, &other, &["--method ti", "--prior-preservation"]);
}

/// One DreamBooth-LoRA step against diffusers' `train_dreambooth_lora.py` written out in
/// torch with peft (scripts/make_method_fixtures.py): the prompt's ids with `<v0>` as
/// "sks person", the masked loss, and every adapter matrix's gradient.
#[test]
fn a_dreambooth_step_matches_diffusers() {
    dreambooth_step("db", &["a photo of <v0>"], 0.0);
}

/// The same with prior preservation: a class image "a photo of person" beside the
/// instance image, its whole-image loss added at weight 1.
#[test]
fn a_dreambooth_step_with_prior_preservation_matches_diffusers() {
    let l_prior = dreambooth_step("dbp", &["a photo of <v0>", "a photo of person"], 1.0);
    let want: f32 = ReferenceStep::load("dbp")
        .get("l_prior")
        .to_scalar()
        .unwrap();
    assert!((l_prior - want).abs() < 1e-6, "l_prior {l_prior} vs {want}");
}

/// The tiny model as a v-prediction model with `upcast_attention` (SD 2.x 768's
/// settings), in `root`.
fn tiny_v_prediction(root: &Path) -> std::path::PathBuf {
    let dir = root.join("tiny-v");
    copy_dir(Path::new(&tiny_sd()), &dir);
    let edit = |file: &str, key: &str, value: serde_json::Value| {
        let path = dir.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit(
        "scheduler/scheduler_config.json",
        "prediction_type",
        "v_prediction".into(),
    );
    edit("unet/config.json", "upcast_attention", true.into());
    dir
}

/// v-prediction: the training target is diffusers' `get_velocity` (1e-6), a DreamBooth
/// step's loss against it and every adapter gradient match diffusers, and a 10-step DDIM
/// image matches diffusers' pipeline with the v-prediction scheduler within 2 levels.
#[test]
fn v_prediction_trains_against_v_and_samples_as_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_v_prediction(tmp.path());
    let sd = StableDiffusion::load(model.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let step = ReferenceStep::load("vp");
    let v = sd
        .schedule
        .target(&step.get("z0"), &step.get("eps"), &step.usizes("t"))
        .unwrap();
    assert!(max_abs_diff(&v, &step.get("target")) < 1e-6, "v");
    dreambooth_step("vp", &["a photo of <v0>"], 0.0);

    let png = tmp.path().join("v.png");
    let latents = fixtures().join("init_latents.safetensors");
    let a = [
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a dog",
        "--init-latents",
        latents.to_str().unwrap(),
        "--steps",
        "10",
        "--guidance",
        "7.5",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        png.to_str().unwrap(),
    ];
    ok(&run_bin("infer", &a));
    let ours: Vec<u8> = read_png(&png).into_raw();
    let want: Vec<u8> = step.get("image").flatten_all().unwrap().to_vec1().unwrap();
    let worst = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 2,
        "the v-prediction image differs by {worst} levels"
    );
}

/// Checks the reference step `prefix` (its last image a class image when `prior > 0`);
/// returns the class images' loss (0 without).
fn dreambooth_step(prefix: &str, prompts: &[&str], prior: f64) -> f32 {
    use candle_core::Tensor;
    use magictailor::model::lora::{LoraModule, TrainableLora};
    use magictailor::train::method::{LossWeights, ATTENTION_PROJECTIONS};
    use magictailor::train::objective::{step_losses, Online, TextParams};
    use magictailor::train::setup::lora_targets;

    let dev = Device::Cpu;
    let step = ReferenceStep::load(prefix);
    let get = |k: &str| step.get(k);
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F32).unwrap();
    let alias = [("<v0>".to_string(), "sks person".to_string())];
    sd.tokenizer.add_aliases(&alias).unwrap();
    let (mut batch, noised) = step.inputs(&sd, &prompts[..1], vec![0], 1);
    if prior > 0.0 {
        // The class image: its prompt names no word, so it is appended here.
        let ids = sd.tokenizer.encode(prompts[1]).unwrap();
        let want: Vec<Vec<i64>> = get("ids").to_vec2().unwrap();
        assert!(ids.iter().zip(&want[1]).all(|(a, b)| *a as i64 == *b));
        let ids = Tensor::from_vec(ids, (1, 77), &dev).unwrap();
        batch.ids = Tensor::cat(&[&batch.ids, &ids], 0).unwrap();
        batch.masks = get("masks");
        batch.sample_of = vec![0, 0];
        batch.token_pos.push(0);
        batch.prior = 1;
    }
    let targets = lora_targets(&sd, Some(&ATTENTION_PROJECTIONS));
    let lora = TrainableLora::new(&targets, 4, 4.0, 0, &dev, DType::F32).unwrap();
    let reference = step.count("grad.") / 2;
    assert_eq!(lora.modules.len(), reference, "the same adapted layers");
    for LoraModule { path, a, b } in &lora.modules {
        a.set(&get(&format!("{path}.A"))).unwrap();
        b.set(&get(&format!("{path}.B"))).unwrap();
    }
    let rows = Tensor::zeros((0, 32), DType::F32, &dev).unwrap();
    let text = TextParams {
        rows: &rows,
        table: None,
        rows_2: None,
        table_2: None,
    };
    let w = LossWeights {
        lambda_attn: 0.0,
        lambda_pres: 0.0,
        clic: None,
        prior,
        vico_reg: None,
        attn_summed: false,
    };
    let losses = step_losses(
        &sd,
        &batch,
        &noised,
        Online::lora(&lora.as_set()),
        text,
        None,
        w,
    )
    .unwrap();
    let (loss, want): (f32, f32) = (
        losses.loss.to_scalar().unwrap(),
        get("loss").to_scalar().unwrap(),
    );
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs {want}");
    let grads = losses.loss.backward().unwrap();
    let mut worst = 0f32;
    for LoraModule { path, a, b } in &lora.modules {
        for (var, which) in [(a, "A"), (b, "B")] {
            let want = get(&format!("grad.{path}.{which}"));
            let got = grads.get(var.as_tensor()).unwrap();
            worst = worst.max(max_abs_diff(got, &want) / max_abs(&want).max(1e-6));
        }
    }
    assert!(
        worst < 1e-4,
        "worst adapter gradient error, relative: {worst}"
    );
    losses.l_prior.map_or(0.0, |l| l.to_scalar().unwrap())
}

/// Custom Diffusion: the cross-attentions' key and value matrices and the modifier rows
/// train, nothing else; the matrices go out in diffusers' attention-processor layout,
/// `infer` on the folder is the base model with those files, and a resumed run ends
/// with the same files byte for byte.
#[test]
fn custom_diffusion_tunes_cross_attention_keys_and_values_and_resumes_exactly() {
    use magictailor::model::tuned::TunedSet;
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let cd_args = |out| tuned_args("custom-diffusion", pair, out, &model);
    let out = tmp.path().join("cd");
    ok(&run_bin("train", &cd_args(&out)));

    let log = read_log(&out);
    assert_eq!(log.len(), 4);
    for l in &log {
        assert_eq!(l["phase"], "custom-diffusion");
        assert_eq!(l["lr"], 5e-3 * 2.0, "scaled by the two images a step");
        assert!(l["grad_norm"].as_f64().unwrap() > 0.0, "{l}");
    }
    let r = record(&out);
    assert_eq!(r["method"]["name"], "custom-diffusion");
    let m = &r["method"];
    assert_eq!(
        m["trains"]["full_matrices"],
        serde_json::json!(["attn2.to_k", "attn2.to_v"])
    );
    assert_eq!(m["trains"]["rows_start_from"][0], "ktn");
    assert_eq!(m["grad_clip"]["of"], "all trained weights");
    assert_eq!(m["scale_augmentation"], true);
    for f in ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"] {
        assert!(
            !out.join(f).exists(),
            "Custom Diffusion trains no adapters, yet {f} exists"
        );
    }

    // The file holds every cross-attention's k and v, each moved off its base weight,
    // and an empty entry for every self-attention's processor.
    let cd = out.join(TUNED_FILE);
    let (t, base, counts, empty) = tuned_tensors(&out, &model);
    let tuned = counts.values().sum::<usize>();
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["to_k.weight", "to_v.weight"]
    );
    assert!(
        tuned > 0 && tuned == 2 * empty,
        "{tuned} tuned, {empty} empty"
    );
    // The modifier rows moved off "ktn" and "pll".
    let embeds = out.join("learned_embeds.safetensors");
    let words = magictailor::io::embeds::load(&embeds, 32, &Device::Cpu).unwrap();
    for ((word, row), init) in words.iter().zip(["ktn", "pll"]) {
        let row: Vec<f32> = row.to_vec1().unwrap();
        let moved = row.iter().zip(class_row(init)).map(|(a, b)| (a - b).abs());
        assert!(moved.fold(0f32, f32::max) > 1e-4, "{word} did not train");
    }

    // `infer` on the folder is the base model with the two files, bit for bit, and the
    // words alone draw something else.
    tuned_folder_draws_as_its_files(tmp.path(), &out, &model, "photo of a <v0>", 4);
    // --export-full: the base U-Net with the tuned matrices merged in, every other tensor
    // the base's bit for bit.
    let full = tmp.path().join("full");
    let cd_full = tmp.path().join("cd-full");
    let export = ["--export-full", full.to_str().unwrap()];
    let a = with_args(cd_args(&cd_full), &export);
    ok(&run_bin("train", &a));
    let merged = candle_core::safetensors::load(
        full.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(full.join("unet/config.json").is_file());
    assert_eq!(merged.len(), base.len());
    let mut replaced = 0;
    for (k, v) in &merged {
        let cd_key = k.rsplit_once('.').and_then(|(path, part)| {
            let (attn, proj) = path.rsplit_once('.')?;
            Some(format!("{attn}.processor.{proj}_custom_diffusion.{part}"))
        });
        match cd_key.and_then(|c| t.get(&c)) {
            Some(tuned) => {
                assert_eq!(max_abs_diff(v, tuned), 0.0, "{k}");
                replaced += 1;
            }
            None => assert_eq!(max_abs_diff(v, &base[k]), 0.0, "{k} changed"),
        }
    }
    assert_eq!(replaced, tuned, "every tuned matrix merged");
    // A flag of the tuned methods only.
    let x = tmp.path().join("x");
    let ti = ["--method", "ti", "--export-full", "y"];
    let a = with_args(quiet_train_args(pair, x.to_str().unwrap(), &model), &ti);
    let o = run_bin("train", &a);
    assert!(
        stderr(&o).contains("--method ti: --export-full"),
        "{}",
        stderr(&o)
    );

    // A file for another U-Net is refused, naming it.
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let targets = sd.unet.lora_targets();
    assert!(TunedSet::load_custom_diffusion(&cd, &targets, &Device::Cpu).is_ok());
    let e = TunedSet::load_custom_diffusion(&cd, &targets[..3], &Device::Cpu).unwrap_err();
    assert!(
        e.to_string().contains("pytorch_custom_diffusion_weights"),
        "{e}"
    );

    // Leave the files, the same run's --export-full U-Net (training is deterministic) and
    // an image for scripts/check_rust_exports.py.
    let check = leave_tuned_check(&out, "custom-diffusion-check", "photo of a <v0> with <v1>");
    copy_dir(&full.join("unet"), &check.join("full/unet"));
    let killed = tmp.path().join("killed");
    let args = cd_args(&killed);
    resumed_after_step_2_ends_the_same(&out, &killed, args, &[TUNED_FILE, EMBEDS_FILE]);
}

/// CLiC: the cross-attentions' four projections (the out bias too) and the rows train,
/// nothing else; each step logs its three terms; the files load back in `infer` as the
/// folder; a resumed run ends with the same files byte for byte.
#[test]
fn clic_tunes_cross_attention_and_logs_its_three_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    let clic_args = |out| tuned_args("clic", pair, out, &model);
    let out = tmp.path().join("clic");
    ok(&run_bin("train", &clic_args(&out)));

    let log = read_log(&out);
    assert_eq!(log.len(), 4);
    for l in &log {
        assert_eq!(l["phase"], "clic");
        let (att, ctx, roi) = (
            l["l_attn"].as_f64().unwrap(),
            l["l_diff"].as_f64().unwrap(),
            l["l_roi"].as_f64().unwrap(),
        );
        assert!(att > 0.0 && ctx > 0.0 && roi > 0.0, "{l}");
        let total = 0.25 * att + 0.5 * ctx + 0.25 * roi;
        assert!(
            (l["loss"].as_f64().unwrap() - total).abs() < 1e-5 * total,
            "{l}"
        );
    }
    let m = &record(&out)["method"];
    assert_eq!(m["name"], "clic");
    assert_eq!(m["weight_decay"], 0.1);
    assert_eq!(m["trains"]["full_matrices"].as_array().unwrap().len(), 4);
    assert_eq!(m["clic_loss_weights"]["context"], 0.5);

    // q/k/v/out of every cross-attention, the out bias too, each moved off its base.
    let (_, _, tuned, _) = tuned_tensors(&out, &model);
    let n = tuned["to_k.weight"];
    for k in [
        "to_q.weight",
        "to_v.weight",
        "to_out.0.weight",
        "to_out.0.bias",
    ] {
        assert_eq!(tuned[k], n, "{tuned:?}");
    }

    tuned_folder_draws_as_its_files(tmp.path(), &out, &model, "a photo of <v0>", 4);
    leave_tuned_check(&out, "clic-check", "a photo of <v0> with <v1>");
    let killed = tmp.path().join("killed");
    let args = clic_args(&killed);
    resumed_after_step_2_ends_the_same(&out, &killed, args, &[TUNED_FILE, EMBEDS_FILE]);
}

/// One Custom Diffusion step against diffusers' `train_custom_diffusion.py` with its
/// attention processors (scripts/make_method_fixtures.py): the rows from "ktn" and "pll",
/// the loss with the tuned key/value matrices (the start-of-text token's held back), every
/// trained gradient, their joint norm, and the rows and matrices after the clipped AdamW
/// step.
#[test]
fn a_custom_diffusion_step_matches_diffusers() {
    use magictailor::train::method::CROSS_ATTENTION_KV;
    let t = TunedStep::load("cd", &CROSS_ATTENTION_KV);
    let prompts = ["photo of a <v0>", "close up photo of a <v1>"];
    let (batch, noised) = t.step.inputs(&t.sd, &prompts, vec![0, 1], 2);
    let losses = t.losses(&batch, &noised, None);
    let (loss, want): (f32, f32) = (
        losses.loss.to_scalar().unwrap(),
        t.step.get("loss").to_scalar().unwrap(),
    );
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs {want}");
    t.check_update(&losses.loss, 1e-4 * 2.0, 1e-2);
}

/// One CLiC step against its authors' `learning.py` written out with diffusers' Custom
/// Diffusion processors (scripts/make_method_fixtures.py): its three loss terms, every
/// gradient (the rows, and q/k/v/out with the out bias of every cross-attention), their
/// joint norm, and the weights after the clipped AdamW step (weight decay 0.1).
#[test]
fn a_clic_step_matches_the_authors_code() {
    use candle_core::Tensor;
    use magictailor::train::method::{ClicWeights, CROSS_ATTENTION_ALL};
    use magictailor::train::objective::RoiPrompts;

    let t = TunedStep::load("clic", &CROSS_ATTENTION_ALL);
    let (mut batch, noised) = t.step.inputs(&t.sd, &["a photo of <v0>"], vec![0], 2);
    let roi = t.sd.tokenizer.encode("<v0> on a blank background").unwrap();
    let want: Vec<Vec<i64>> = t.step.get("roi_ids").to_vec2().unwrap();
    assert!(roi.iter().zip(&want[0]).all(|(a, b)| *a as i64 == *b));
    let word = t.sd.tokenizer.encode("<v0>").unwrap()[1];
    batch.roi = Some(RoiPrompts {
        token_pos: vec![roi.iter().position(|&i| i == word).unwrap()],
        ids: Tensor::from_vec(roi, (1, 77), &Device::Cpu).unwrap(),
        ids_2: None,
    });
    let losses = t.losses(&batch, &noised, Some(ClicWeights::PAPER));
    let l_roi = losses.l_roi.clone().unwrap();
    for (name, got, key) in [
        ("L_att", &losses.l_attn, "l_att"),
        ("L_context", &losses.l_diff, "l_ctx"),
        ("L_RoI", &l_roi, "l_roi"),
        ("the loss", &losses.loss, "loss"),
    ] {
        let got: f32 = got.to_scalar().unwrap();
        let want: f32 = t.step.get(key).to_scalar().unwrap();
        assert!(
            (got - want).abs() < 2e-6 * want.abs().max(1.0),
            "{name}: {got} vs {want}"
        );
    }
    t.check_update(&losses.loss, 5e-5, 0.1);
}

/// A tuned method's reference step: the tiny model with `<v0>`, `<v1>` as rows from "ktn"
/// and "pll", and the layers `only` names tuned, at the fixture's values where it records
/// them (else at the base's).
struct TunedStep {
    step: ReferenceStep,
    sd: StableDiffusion,
    rows: candle_core::Var,
    tuned: magictailor::model::tuned::TrainableTuned,
}

impl TunedStep {
    fn load(prefix: &str, only: &[&str]) -> Self {
        use magictailor::model::tuned::TrainableTuned;
        use magictailor::train::method::CUSTOM_DIFFUSION_INIT;
        let step = ReferenceStep::load(prefix);
        let mut sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
        sd.tokenizer
            .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
            .unwrap();
        let init: Vec<candle_core::Tensor> = (CUSTOM_DIFFUSION_INIT[..2].iter())
            .map(|w| {
                let id = sd.tokenizer.encode(w).unwrap()[1];
                sd.text_encoder.token_row(id).unwrap()
            })
            .collect();
        let rows = candle_core::Tensor::stack(&init, 0).unwrap();
        assert_eq!(max_abs_diff(&rows, &step.get("rows_init")), 0.0);
        let paths: Vec<String> = (magictailor::train::setup::lora_targets(&sd, Some(only)))
            .into_iter()
            .map(|t| t.path)
            .collect();
        let tuned = TrainableTuned::new(sd.unet.base_weights(&paths), true, DType::F32).unwrap();
        assert_eq!(
            tuned.named().len(),
            step.count("grad.") - 1,
            "the same tuned tensors"
        );
        for (name, v) in tuned.named() {
            if let Some(w) = step.0.get(name.strip_prefix("tuned.").unwrap()) {
                v.set(w).unwrap();
            }
        }
        Self {
            step,
            sd,
            rows: candle_core::Var::from_tensor(&rows).unwrap(),
            tuned,
        }
    }

    fn losses(
        &self,
        batch: &magictailor::train::objective::Batch,
        noised: &magictailor::train::objective::Noised,
        clic: Option<magictailor::train::method::ClicWeights>,
    ) -> magictailor::train::objective::StepLosses {
        use magictailor::train::objective::{step_losses, Online, TextParams};
        let (none, set) = (
            magictailor::model::lora::LoraSet::default(),
            self.tuned.as_set(),
        );
        let online = Online {
            lora: &none,
            tuned: Some(&set),
            vico: None,
            full: None,
        };
        let text = TextParams {
            rows: self.rows.as_tensor(),
            table: None,
            rows_2: None,
            table_2: None,
        };
        let w = magictailor::train::method::LossWeights {
            lambda_attn: 0.0,
            lambda_pres: 0.0,
            clic,
            prior: 0.0,
            vico_reg: None,
            attn_summed: false,
        };
        step_losses(&self.sd, batch, noised, online, text, None, w).unwrap()
    }

    /// Every gradient of `loss` (1e-4 of its largest entry), their joint norm (1e-4), and
    /// the weights after AdamW (`lr`, `weight_decay`) with the joint clip to 1 (1e-6).
    fn check_update(&self, loss: &candle_core::Tensor, lr: f64, weight_decay: f64) {
        use magictailor::train::optim::{clip_coef, grad_norm, AdamW, AdamWConfig, Clip};
        let get = |k: &str| self.step.get(k);
        let grads = loss.backward().unwrap();
        let named: Vec<(String, candle_core::Var)> = (self.tuned.named().into_iter())
            .map(|(n, v)| (n.strip_prefix("tuned.").unwrap().to_string(), v))
            .chain([("rows".to_string(), self.rows.clone())])
            .collect();
        let mut worst = (0f32, String::new());
        for (name, var) in &named {
            let want = get(&format!("grad.{name}"));
            let got = grads.get(var.as_tensor()).unwrap();
            let rel = max_abs_diff(got, &want) / max_abs(&want).max(1e-6);
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        assert!(worst.0 < 1e-4, "worst gradient error, relative: {worst:?}");
        let mut params = vec![self.rows.clone()];
        params.extend(self.tuned.vars());
        let norm = grad_norm(&grads, &params).unwrap();
        let want_norm: f32 = get("grad_norm").to_scalar().unwrap();
        assert!(
            ((norm as f32) - want_norm).abs() < 1e-4 * want_norm,
            "norm {norm} vs {want_norm}"
        );
        let config = AdamWConfig {
            lr,
            weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(params.clone(), config).unwrap();
        let clip = Clip {
            params: &params,
            coef: clip_coef(norm, 1.0),
        };
        opt.step_clipped(&grads, Some(clip)).unwrap();
        let mut after = 0f32;
        for (name, v) in &named {
            let key = if name == "rows" {
                "rows_after".to_string()
            } else {
                format!("after.{name}")
            };
            after = after.max(max_abs_diff(v.as_tensor(), &get(&key)));
        }
        assert!(
            after < 1e-6,
            "weights after the clipped AdamW step differ by {after}"
        );
    }
}

/// Custom Diffusion's scale augmentation against its dataset's `preprocess` (PIL's
/// bilinear resize, then placed on a zero canvas or cropped, and the valid-region mask)
/// for a shrunk, an enlarged and an unchanged side.
#[test]
fn custom_diffusion_rescaling_matches_its_dataset() {
    use magictailor::train::augment::Rescale;
    let step = ReferenceStep::load("rescale");
    let image = step.get("image").unsqueeze(0).unwrap();
    let ones = candle_core::Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
    for k in 0..3 {
        let [side, top, left] = step.usizes(&format!("{k}.args"))[..] else {
            panic!("three args")
        };
        let r = Rescale {
            size: 64,
            side,
            top,
            left,
        };
        let (pixels, mask) = r.apply(&image, &ones, 8).unwrap();
        let want = step.get(&format!("{k}.pixels")).unsqueeze(0).unwrap();
        // PIL rounds its result to whole levels.
        let d = max_abs_diff(&pixels, &want) * 127.5;
        assert!(d <= 1.01, "side {side}: pixels differ by {d} levels");
        let latent = magictailor::model::nn::resize_nearest(&mask, 8, 8).unwrap();
        let want = step
            .get(&format!("{k}.mask"))
            .reshape((1, 1, 8, 8))
            .unwrap();
        assert_eq!(
            max_abs_diff(&latent, &want),
            0.0,
            "side {side}: valid region"
        );
    }
}

/// `batch --method ti` trains every pair with the method (one model load), and a re-run
/// finds them finished.
#[test]
fn batch_trains_every_pair_with_the_method() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pairs");
    for (concept, component) in [("person_a", "hair_a"), ("person_b", "hair_b")] {
        let mut spec = PairSpec::training();
        (spec.samples[0].0, spec.samples[1].0) = (concept, component);
        pair_folder(&dir, &spec);
    }
    let (root, model) = (tmp.path().join("runs"), tiny_sd());
    let (d, r) = (dir.to_str().unwrap(), root.to_str().unwrap());
    let mut args = vec![
        "--pairs",
        d,
        "--out-dir",
        r,
        "--model",
        &model,
        "--resolution",
        "64",
    ];
    args.extend([
        "--method",
        "ti",
        "--steps",
        "2",
        "--images-per-step",
        "2",
        "--quiet",
    ]);
    ok(&run_bin("batch", &args));
    let text = std::fs::read_to_string(root.join("batch_summary.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = (text.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["status"], "trained", "{l}");
        assert_eq!(l["steps_done"], 2);
        assert_eq!(l["total_steps"], 2);
        let out = root.join(l["pair"].as_str().unwrap());
        assert_eq!(record(&out)["method"]["name"], "ti");
        assert!(out.join("learned_embeds.safetensors").exists());
        assert!(!out.join("pytorch_lora_weights.safetensors").exists());
    }
    ok(&run_bin("batch", &args));
    let text = std::fs::read_to_string(root.join("batch_summary.jsonl")).unwrap();
    let again: Vec<serde_json::Value> = (text.lines().skip(2))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(again.iter().all(|l| l["status"] == "skipped"), "{again:?}");
}

/// `batch --methods ti,dreambooth` trains the grid: every pair with every method, into
/// `root/METHOD/PAIR/`, one model load; the summary names each run's folder and method; a
/// re-run skips them all; a flag that does not apply to every listed method is refused.
#[test]
fn batch_trains_the_method_by_pair_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pairs");
    for (concept, component) in [("person_a", "hair_a"), ("person_b", "hair_b")] {
        let mut spec = PairSpec::training();
        (spec.samples[0].0, spec.samples[1].0) = (concept, component);
        pair_folder(&dir, &spec);
    }
    let (root, model) = (tmp.path().join("runs"), tiny_sd());
    let (d, r) = (dir.to_str().unwrap(), root.to_str().unwrap());
    let base = vec![
        "--pairs",
        d,
        "--out-dir",
        r,
        "--model",
        &model,
        "--resolution",
        "64",
        "--quiet",
    ];
    let args = with_args(
        base.clone(),
        &["--methods", "ti,dreambooth", "--steps", "2"],
    );
    let o = run_bin("batch", &args);
    let text = std::fs::read_to_string(root.join("batch_summary.jsonl")).unwrap_or_default();
    assert!(o.status.success(), "{}\n{text}", stderr(&o));
    let text = std::fs::read_to_string(root.join("batch_summary.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = (text.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        assert_eq!(l["status"], "trained", "{l}");
        assert_eq!(
            l["model_loads_in_process"], 1,
            "one model load for the grid"
        );
        let folder = l["folder"].as_str().unwrap();
        let method = l["method"].as_str().unwrap();
        assert_eq!(folder, format!("{method}/{}", l["pair"].as_str().unwrap()));
        let out = root.join(folder);
        assert_eq!(record(&out)["method"]["name"], method);
        assert_eq!(record(&out)["steps_done"], 2);
    }
    let md = std::fs::read_to_string(root.join("batch_summary.md")).unwrap();
    assert!(md.contains("| ti/person_a+hair_a | ti | trained |"), "{md}");
    ok(&run_bin("batch", &args));
    let text = std::fs::read_to_string(root.join("batch_summary.jsonl")).unwrap();
    assert!(
        text.lines().skip(4).all(|l| l.contains("\"skipped\"")),
        "{text}"
    );

    // --steps is not MagicTailor's.
    let a = with_args(
        base.clone(),
        &["--methods", "ti,magictailor", "--steps", "2"],
    );
    let o = run_bin("batch", &a);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--method magictailor: --steps"),
        "{}",
        stderr(&o)
    );
    let a = with_args(base, &["--methods", "ti", "--method", "ti"]);
    assert!(!run_bin("batch", &a).status.success());
}

const TUNED_FILE: &str = "pytorch_custom_diffusion_weights.safetensors";
const EMBEDS_FILE: &str = "learned_embeds.safetensors";

/// `train --method METHOD` of a tuned method at 64 px: 4 steps at a rate large enough to
/// move the matrices visibly, a checkpoint every 2.
fn tuned_args<'a>(method: &'a str, pair: &'a str, out: &'a Path, model: &'a str) -> Vec<&'a str> {
    let more = [
        "--method",
        method,
        "--steps",
        "4",
        "--lr",
        "5e-3",
        "--checkpoint-every",
        "2",
    ];
    with_args(quiet_train_args(pair, out.to_str().unwrap(), model), &more)
}

type Tensors = std::collections::HashMap<String, candle_core::Tensor>;

/// A tuned run's matrices file and the base U-Net's tensors, after checking that every
/// tuned tensor is a cross-attention's and moved off its base; with how many there are
/// of each `proj.part` and how many processors have an empty entry.
fn tuned_tensors(
    out: &Path,
    model: &str,
) -> (
    Tensors,
    Tensors,
    std::collections::BTreeMap<String, usize>,
    usize,
) {
    let t = candle_core::safetensors::load(out.join(TUNED_FILE), &Device::Cpu).unwrap();
    let unet = Path::new(model).join("unet/diffusion_pytorch_model.safetensors");
    let base = candle_core::safetensors::load(unet, &Device::Cpu).unwrap();
    let (mut counts, mut empty) = (std::collections::BTreeMap::new(), 0);
    for (k, v) in &t {
        if v.elem_count() == 0 {
            assert!(k.ends_with("attn1.processor"), "{k}");
            empty += 1;
            continue;
        }
        let (attn, rest) = k.split_once(".processor.").unwrap();
        assert!(attn.ends_with(".attn2"), "{k}");
        let (proj, part) = rest.rsplit_once('.').unwrap();
        let proj = proj.replace("_custom_diffusion", "");
        let b = &base[&format!("{attn}.{proj}.{part}")];
        assert!(max_abs_diff(v, b) > 0.0, "{k} did not train");
        *counts.entry(format!("{proj}.{part}")).or_insert(0) += 1;
    }
    (t, base, counts, empty)
}

/// `infer` at 64 px, 3 steps, of `prompt` with `extra` flags, into `png`.
fn draw_64(extra: &[&str], prompt: &str, png: &Path) {
    let mut a = vec!["--prompt", prompt, "--width", "64", "--height", "64"];
    a.extend(["--steps", "3", "--quiet", "--out", png.to_str().unwrap()]);
    a.extend(extra);
    ok(&run_bin("infer", &a));
}

/// A tuned method's finished folder `out` (last step `last`): `infer` on it draws what the
/// base model with its matrices file and words draws, and what its last checkpoint draws;
/// the words alone draw something else.
fn tuned_folder_draws_as_its_files(tmp: &Path, out: &Path, model: &str, prompt: &str, last: usize) {
    let png = |name: &str| tmp.join(name);
    let (dir, step) = (out.to_str().unwrap(), last.to_string());
    let (cd, embeds) = (out.join(TUNED_FILE), out.join(EMBEDS_FILE));
    let (cd, embeds) = (cd.to_str().unwrap(), embeds.to_str().unwrap());
    draw_64(&["--model-dir", dir], prompt, &png("dir.png"));
    let files = [
        "--model",
        model,
        "--custom-diffusion",
        cd,
        "--embeds",
        embeds,
    ];
    draw_64(&files, prompt, &png("files.png"));
    draw_64(
        &["--model-dir", dir, "--checkpoint", &step],
        prompt,
        &png("last.png"),
    );
    draw_64(
        &["--model", model, "--embeds", embeds],
        prompt,
        &png("rows.png"),
    );
    let pixels = |name: &str| read_png(&png(name));
    assert_eq!(png_max_diff(&pixels("dir.png"), &pixels("files.png")), 0);
    assert_eq!(png_max_diff(&pixels("dir.png"), &pixels("last.png")), 0);
    assert!(
        png_max_diff(&pixels("dir.png"), &pixels("rows.png")) > 0,
        "the matrices count"
    );
}

/// Leaves `out`'s matrices file, A1111 words and `infer`'s image of `prompt` from fixed
/// latents in `target/tmp/{name}/` for scripts/check_rust_exports.py, which loads the
/// files with diffusers' `load_attn_procs` and `load_textual_inversion`; returns the folder.
fn leave_tuned_check(out: &Path, name: &str, prompt: &str) -> std::path::PathBuf {
    let check = leave_check(out, name, prompt);
    std::fs::copy(out.join(TUNED_FILE), check.join(TUNED_FILE)).unwrap();
    check
}

/// `out` killed after step 2 (only that checkpoint left in `killed`) and resumed with
/// `args` plus `--resume` ends with the same `files`, byte for byte.
fn resumed_after_step_2_ends_the_same(
    out: &Path,
    killed: &Path,
    mut args: Vec<&str>,
    files: &[&str],
) {
    std::fs::create_dir_all(killed.join("checkpoints")).unwrap();
    let first = "checkpoints/step-000002.safetensors";
    std::fs::copy(out.join(first), killed.join(first)).unwrap();
    args.push("--resume");
    ok(&run_bin("train", &args));
    for f in files {
        assert_eq!(read_bytes(&killed.join(f)), read_bytes(&out.join(f)), "{f}");
    }
}

/// One method's reference step in `method_steps.safetensors` (scripts/make_method_fixtures.py),
/// its tensors named without the method's prefix (`ti.`, `db.`).
struct ReferenceStep(std::collections::HashMap<String, candle_core::Tensor>);

impl ReferenceStep {
    fn load(prefix: &str) -> Self {
        let file = fixtures().join("method_steps.safetensors");
        let all = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
        let pre = format!("{prefix}.");
        Self(
            (all.into_iter())
                .filter_map(|(k, v)| Some((k.strip_prefix(&pre)?.to_string(), v)))
                .collect(),
        )
    }

    fn get(&self, k: &str) -> candle_core::Tensor {
        self.0
            .get(k)
            .unwrap_or_else(|| panic!("the fixture lacks {k}"))
            .clone()
    }

    fn usizes(&self, k: &str) -> Vec<usize> {
        let v: Vec<i64> = self.get(k).to_vec1().unwrap();
        v.into_iter().map(|x| x as usize).collect()
    }

    /// How many tensors' names start with `start`.
    fn count(&self, start: &str) -> usize {
        self.0.keys().filter(|k| k.starts_with(start)).count()
    }

    /// The step's batch (the prompts tokenized here, checked against the reference's ids,
    /// each image's word found in its prompt) and its noised latents; the pixels are
    /// unused, as the latents are given.
    fn inputs(
        &self,
        sd: &StableDiffusion,
        prompts: &[&str],
        sample_of: Vec<usize>,
        n_samples: usize,
    ) -> (
        magictailor::train::objective::Batch,
        magictailor::train::objective::Noised,
    ) {
        use candle_core::Tensor;
        use magictailor::train::objective::{Batch, Noised};
        let ids: Vec<Vec<u32>> = (prompts.iter())
            .map(|p| sd.tokenizer.encode(p).unwrap())
            .collect();
        let want: Vec<Vec<i64>> = self.get("ids").to_vec2().unwrap();
        for (got, want) in ids.iter().zip(&want) {
            let same = got.iter().zip(want).all(|(a, b)| *a as i64 == *b);
            assert!(same, "{got:?} vs {want:?}");
        }
        let token_pos = (ids.iter().zip(&sample_of))
            .map(|(ids, s)| {
                let word = sd.tokenizer.encode(&format!("<v{s}>")).unwrap()[1];
                ids.iter().position(|&i| i == word).unwrap()
            })
            .collect();
        let flat: Vec<u32> = ids.concat();
        let b = prompts.len();
        let batch = Batch {
            pixels: Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            masks: self.get("masks"),
            ids: Tensor::from_vec(flat, (b, 77), &Device::Cpu).unwrap(),
            ids_2: None,
            token_pos,
            sample_of,
            n_samples,
            roi: None,
            prior: 0,
            reference: None,
            posterior: None,
        };
        let noised = Noised {
            z_t: self.get("z_t"),
            eps: self.get("eps"),
            // The v-prediction step's target; the noise otherwise.
            target: self
                .0
                .get("target")
                .cloned()
                .unwrap_or_else(|| self.get("eps")),
            timesteps: self.usizes("t"),
            masks: self.get("masks"),
            reference: None,
        };
        (batch, noised)
    }
}
