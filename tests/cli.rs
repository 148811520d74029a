//! The real binary, end to end: reproducing diffusers' images, trained folders, and the
//! errors a user sees for bad input (clear message, non-zero exit, nothing written).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// Runs `infer` like the SD 2.x reference run (`Family::infer_like_reference`).
fn infer_like_reference(model: &[&str], out: &Path, prompt: &str) -> Output {
    SD2.infer_like_reference(model, out, prompt)
}

#[test]
fn infer_reproduces_diffusers_image() {
    let dir = tempfile::tempdir().unwrap();
    for fam in &FAMILIES {
        let out = dir.path().join("base.png");
        let o = fam.infer_like_reference(&["--model", &fam.model()], &out, "a photo of a dog");
        assert!(o.status.success(), "{}: {}", fam.name, stderr(&o));
        let d = png_max_diff(&read_png(&out), &read_png(&fam.path("ddim_base.png")));
        assert!(d <= 2, "{}: max pixel difference {d} levels", fam.name);
    }
}

#[test]
fn infer_reproduces_diffusers_image_with_lora_and_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    for fam in &FAMILIES {
        let out = dir.path().join("personal.png");
        let args = fam.personal_args();
        let model: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = fam.infer_like_reference(&model, &out, "<v0> with <v1>, in the snow");
        assert!(o.status.success(), "{}: {}", fam.name, stderr(&o));
        let got = read_png(&out);
        let d = png_max_diff(&got, &read_png(&fam.path("ddim_personal.png")));
        assert!(d <= 2, "{}: max pixel difference {d} levels", fam.name);
        // And the personalization matters: the base image differs a lot.
        assert!(png_max_diff(&got, &read_png(&fam.path("ddim_base.png"))) > 20);
    }
}

#[test]
fn half_precision_infer_stays_close_to_the_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    for fam in &FAMILIES {
        let out = dir.path().join("f16.png");
        let args = fam.personal_args();
        let mut model: Vec<&str> = args.iter().map(String::as_str).collect();
        model.extend(["--dtype", "f16"]);
        let o = fam.infer_like_reference(&model, &out, "<v0> with <v1>, in the snow");
        assert!(o.status.success(), "{}: {}", fam.name, stderr(&o));
        let d = png_max_diff(&read_png(&out), &read_png(&fam.path("ddim_personal.png")));
        assert!(
            d <= 4,
            "{}: f16 vs diffusers f32: max pixel difference {d} levels (measured 2)",
            fam.name
        );
    }
    // bf16 needs CUDA (candle's CPU conv has none): refused with the way out.
    let bf16 = ["--model", &tiny_sd(), "--dtype", "bf16", "--device", "cpu"];
    let o = infer_like_reference(&bf16, &dir.path().join("no.png"), "a dog");
    assert!(!o.status.success() && stderr(&o).contains("--dtype f16 or f32"));
}

/// A folder that looks trained: the fixture LoRA and pseudo-words under the names
/// `train` writes, and a `magictailor.json` naming `base_model`.
fn trained_folder(root: &Path, base_model: &str) -> PathBuf {
    let trained = root.join("trained");
    std::fs::create_dir(&trained).unwrap();
    std::fs::copy(
        fixtures().join("lora_peft.safetensors"),
        trained.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("learned_embeds.safetensors"),
        trained.join("learned_embeds.safetensors"),
    )
    .unwrap();
    let run_json = serde_json::json!({ "base_model": base_model });
    std::fs::write(trained.join("magictailor.json"), run_json.to_string()).unwrap();
    trained
}

#[test]
fn trained_folder_is_found_through_magictailor_json() {
    let dir = tempfile::tempdir().unwrap();
    let trained = trained_folder(dir.path(), &tiny_sd());
    let out = dir.path().join("r.png");
    let o = infer_like_reference(
        &["--model-dir", trained.to_str().unwrap()],
        &out,
        "<v0> with <v1>, in the snow",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        png_max_diff(
            &read_png(&out),
            &read_png(&fixtures().join("ddim_personal.png"))
        ) <= 2
    );
}

/// The base model moved after training: `--model-dir RUN --model BASE` takes the adapters
/// and pseudo-words from RUN and the weights from BASE, reproducing diffusers' personal
/// image; without `--model` the run is refused, naming the base folder it cannot find.
#[test]
fn model_replaces_a_moved_base_model_of_a_trained_folder() {
    let dir = tempfile::tempdir().unwrap();
    let moved = dir.path().join("moved-away").join("tiny-sd");
    let moved = moved.to_str().unwrap();
    let trained = trained_folder(dir.path(), moved);
    let trained = trained.to_str().unwrap();
    let prompt = "<v0> with <v1>, in the snow";

    let out = dir.path().join("r.png");
    let o = infer_like_reference(
        &["--model-dir", trained, "--model", &tiny_sd()],
        &out,
        prompt,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_png(&out);
    let d = png_max_diff(&got, &read_png(&fixtures().join("ddim_personal.png")));
    assert!(d <= 2, "max pixel difference {d} levels");
    assert!(
        png_max_diff(&got, &read_png(&fixtures().join("ddim_base.png"))) > 20,
        "the folder's adapters and pseudo-words were used, not only the base model"
    );

    let never = dir.path().join("never.png");
    let o = infer_like_reference(&["--model-dir", trained], &never, prompt);
    assert_failed(&o, &never, moved);
}

/// `infer` reads a trained folder's `token_embedding.safetensors` (a `--released-script`
/// run's whole token table): one whose shape does not fit the text encoder is refused,
/// naming the file, before anything is written.
#[test]
fn a_token_table_of_the_wrong_shape_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let trained = trained_folder(dir.path(), &tiny_sd());
    let table =
        candle_core::Tensor::zeros((10, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            magictailor::io::run::TOKEN_TABLE_KEY.to_string(),
            table,
        )]),
        trained.join("token_embedding.safetensors"),
    )
    .unwrap();
    let out = dir.path().join("never.png");
    let o = infer_like_reference(
        &["--model-dir", trained.to_str().unwrap()],
        &out,
        "<v0> with <v1>, in the snow",
    );
    assert_failed(&o, &out, "token_embedding.safetensors");
}

#[test]
fn tiny_random_numbers_several_images_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let gen = |seed: &str, out: &Path| {
        let o = run_bin(
            "infer",
            &[
                "--model",
                "tiny-random",
                "--prompt",
                "a red dog",
                "--num-images",
                "2",
                "--steps",
                "3",
                "--width",
                "64",
                "--height",
                "48",
                "--seed",
                seed,
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    };
    gen("7", &dir.path().join("a.png"));
    gen("7", &dir.path().join("b.png"));
    gen("8", &dir.path().join("c.png"));
    let img = |n: &str| read_png(&dir.path().join(n));
    assert_eq!(img("a-0.png").dimensions(), (64, 48));
    assert!(
        !dir.path().join("a.png").exists(),
        "several images are numbered"
    );
    assert_eq!(img("a-0.png"), img("b-0.png"), "same seed, same bytes");
    assert_eq!(img("a-1.png"), img("b-1.png"));
    assert_ne!(img("a-0.png"), img("a-1.png"), "images of one batch differ");
    assert_ne!(
        img("a-0.png"),
        img("c-0.png"),
        "another seed, another image"
    );
}

/// A bad `infer` invocation: non-zero exit, no panic, a message containing `needle`, no
/// output.
fn assert_refused(args: &[&str], out: &Path, needle: &str) {
    assert_failed(&run_bin("infer", args), out, needle);
}

/// What a refused command must look like: non-zero exit, no panic, a message
/// containing `needle`, nothing written at `out`.
fn assert_failed(o: &Output, out: &Path, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure ({needle})");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!out.exists(), "nothing may be written on failure");
}

fn base_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--model", model, "--prompt", "a dog", "--steps", "2", "--width", "64", "--height", "64",
        "--quiet", "--out", out,
    ]
}

#[test]
fn zero_group_or_head_counts_in_a_config_are_refused_not_divided_by() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    for (key, value) in [
        ("norm_num_groups", serde_json::json!(0)),
        ("attention_head_dim", serde_json::json!([0, 2, 2, 2])),
    ] {
        let model = dir.path().join(key);
        copy_dir(Path::new(&tiny_sd()), &model);
        let cfg = model.join("unet/config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(&cfg, c.to_string()).unwrap();
        let args = base_args(model.to_str().unwrap(), out.to_str().unwrap());
        assert_refused(&args, &out, "does not support");
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let o = out.to_str().unwrap();
    let tiny = tiny_sd();

    assert_refused(&base_args("/no/such/model", o), &out, "does not exist");

    // Incomplete folder: no U-Net weights.
    let incomplete = dir.path().join("incomplete");
    copy_dir(Path::new(&tiny), &incomplete);
    std::fs::remove_file(incomplete.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_refused(
        &base_args(incomplete.to_str().unwrap(), o),
        &out,
        "no safetensors weights in",
    );

    // Corrupt (truncated) weights.
    let corrupt = dir.path().join("corrupt");
    copy_dir(Path::new(&tiny), &corrupt);
    let w = corrupt.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&base_args(corrupt.to_str().unwrap(), o), &out, "truncated");

    // A hub id while offline, with an empty cache.
    let o2 = bin_command("infer", &base_args("someone/some-model", o))
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    let err = stderr(&o2);
    assert!(
        !o2.status.success() && err.contains("HF_HUB_OFFLINE") && err.contains("--model DIR"),
        "{err}"
    );

    // Unknown pseudo-word.
    let mut a = base_args(&tiny, o);
    a[3] = "<v0> on the beach";
    assert_refused(&a, &out, "Known pseudo-words");

    // Width not a multiple of the VAE factor.
    let mut a = base_args(&tiny, o);
    a[7] = "60";
    assert_refused(&a, &out, "multiple of 8");

    // Init latents of the wrong shape.
    let mut a = base_args(&tiny, o);
    a[7] = "128";
    let lat = fixture("init_latents.safetensors");
    a.extend(["--init-latents", &lat]);
    assert_refused(&a, &out, "needs [1, 4, 8, 16]");

    // No trained folder and no --model.
    let missing = dir.path().join("nothing-trained");
    assert_refused(
        &[
            "--model-dir",
            missing.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            o,
        ],
        &out,
        "is not a trained magictailor folder",
    );

    // Schedules magictailor does not implement are refused by name: sample prediction,
    // zero terminal SNR (v-prediction loads: tests/methods.rs).
    for (from, to, said) in [
        ("\"epsilon\"", "\"sample\"", "prediction_type \"sample\""),
        (
            "\"rescale_betas_zero_snr\": false",
            "\"rescale_betas_zero_snr\": true",
            "zero terminal SNR",
        ),
    ] {
        let other = dir.path().join("schedule");
        let _ = std::fs::remove_dir_all(&other);
        copy_dir(Path::new(&tiny), &other);
        let cfg = other.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(from, to);
        std::fs::write(&cfg, text).unwrap();
        assert_refused(&base_args(other.to_str().unwrap(), o), &out, said);
    }

    // A LoRA for another model.
    let mut a = base_args("tiny-random", o);
    let lora = fixture("lora_peft.safetensors");
    a.extend(["--lora", &lora]);
    assert_refused(&a, &out, "another base model");
}

#[test]
fn fp16_weight_files_load_and_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let half = dir.path().join("half");
    copy_dir(Path::new(&tiny_sd()), &half);
    // Replace the U-Net's weights by an fp16 variant file, as hub repos ship them.
    let full = half.join("unet/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&full, &candle_core::Device::Cpu).unwrap();
    let f16: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(candle_core::DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &f16,
        half.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(&full).unwrap();
    let out = dir.path().join("half.png");
    let o = infer_like_reference(
        &["--model", half.to_str().unwrap()],
        &out,
        "a photo of a dog",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let d = png_max_diff(
        &read_png(&out),
        &read_png(&fixtures().join("ddim_base.png")),
    );
    assert!(
        d <= 12,
        "fp16-rounded weights moved the image by {d} levels"
    );
}

/// Flags of the many-prompt mode given with a single --prompt are refused (exit 2, no
/// image), not ignored.
#[test]
fn many_prompt_flags_with_one_prompt_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let model = tiny_sd();
    let base = small_infer(&model, "a dog", png.to_str().unwrap());
    for extra in [
        &["--seeds", "0..3"][..],
        &["--grid"],
        &["--batch-size", "2"],
        &["--out-dir", "x"],
        &["--placeholder", "y"],
    ] {
        let o = run_bin("infer", &[&base[..], extra].concat());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(&format!("{} only applies with --prompts-file", extra[0])),
            "{err}"
        );
        assert!(!png.exists());
    }
    let o = run_bin("infer", &[&base[..], &["--grid", "--seeds", "1"]].concat());
    assert!(
        stderr(&o).contains("--seeds, --grid only apply with --prompts-file"),
        "{}",
        stderr(&o)
    );
}

/// A prompt longer than the text encoder's 77 tokens: refused when a pseudo-word would
/// fall past the end (it would be dropped without a trace), else drawn with a warning
/// that gives the token count.
#[test]
fn prompts_past_the_text_encoders_window() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let (model, embeds) = (tiny_sd(), fixture("learned_embeds.safetensors"));
    let filler = vec!["a"; 90].join(" ");
    let run = |prompt: &str| {
        let args = small_infer(&model, prompt, png.to_str().unwrap());
        run_bin("infer", &with_args(args, &["--embeds", &embeds]))
    };
    let o = run(&format!("{filler} <v0>"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tokens long, over the text encoder's 77: <v0> would fall past"),
        "{err}"
    );
    assert!(!png.exists());
    let o = run(&format!("<v0> with <v1>, {filler}"));
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning: the prompt") && err.contains("the first 77"),
        "{err}"
    );
    assert!(png.exists());
}

/// Messages that name the way on: a dataset root given to `train` points at `batch`; an
/// unfinished run given to `infer` says to finish it; a flag that does not apply is
/// refused in a sentence.
#[test]
fn messages_name_the_way_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dataset");
    let pair = pair_folder(&root, &PairSpec::training());
    let model = tiny_sd();
    let out = tmp.path().join("run");
    let (root_s, out_s) = (root.to_str().unwrap(), out.to_str().unwrap());
    let o = run_bin("train", &quiet_train_args(root_s, out_s, &model));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("holds 1 of them (person_k+hair_c)"), "{err}");
    assert!(
        err.contains(&format!("magictailor batch --pairs {root_s}")),
        "{err}"
    );
    assert!(!out.exists());

    let mut args = short_run_args(pair.to_str().unwrap(), out_s, &model);
    args.retain(|a| *a != "--quiet");
    let o = run_bin(
        "train",
        &with_args(args.clone(), &["--no-ds-bal", "--ema-decay", "0.9"]),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let want = "--no-ds-bal: --ema-decay only shapes DS-Bal, which --no-ds-bal turns off";
    assert!(stderr(&o).contains(want), "{}", stderr(&o));
    assert!(!out.exists(), "a refused run writes nothing");
    ok(&run_bin("train", &with_args(args, &["--no-ds-bal"])));

    std::fs::remove_file(out.join("magictailor.json")).unwrap();
    let png = tmp.path().join("x.png");
    let args = [
        "--model-dir",
        out_s,
        "--prompt",
        "<v0>",
        "--out",
        png.to_str().unwrap(),
    ];
    let o = run_bin("infer", &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is an unfinished run") && err.contains("--resume"),
        "{err}"
    );
}

/// Values that cannot sample are refused before any model loads (the model named here
/// does not exist), with the valid range: NaN, infinity, negative numbers, too many
/// steps, an output name that is not a PNG's.
#[test]
fn out_of_range_values_are_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let jpg = tmp.path().join("x.jpg");
    let absent = tmp.path().join("no-model");
    let base = ["--model", absent.to_str().unwrap(), "--prompt", "a dog"];
    for (extra, want) in [
        (
            &["--guidance", "NaN"][..],
            "--guidance NaN: expected a number >= 0",
        ),
        (
            &["--guidance", "inf"],
            "--guidance inf: expected a number >= 0",
        ),
        (
            &["--guidance", "-1"],
            "--guidance -1: expected a number >= 0",
        ),
        (&["--steps", "2000"], "--steps 2000: expected 1 to 1000"),
        (&["--out", jpg.to_str().unwrap()], "writes PNG images"),
    ] {
        let mut args = [&base[..], extra].concat();
        if !extra.contains(&"--out") {
            args.extend(["--out", png.to_str().unwrap()]);
        }
        let o = run_bin("infer", &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!png.exists() && !jpg.exists());
    }
    let absent_run = tmp.path().join("no-run");
    for (flag, value, want) in [
        (
            "--guidance",
            "nan",
            "--guidance NaN: expected a number >= 0",
        ),
        ("--steps", "2000", "--steps 2000: expected 1 to 1000"),
    ] {
        let args = [
            "--model-dir",
            absent_run.to_str().unwrap(),
            "--segment",
            "none",
            flag,
            value,
        ];
        let o = run_bin("eval", &args);
        assert_eq!(o.status.code(), Some(2), "eval {flag}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "eval {flag}: {}", stderr(&o));
    }
    let o = run_bin("train", &["--instance-dir", "x", "--warmup-steps", "-5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid value '-5' for '--warmup-steps"),
        "{}",
        stderr(&o)
    );
}

/// Image i of `--num-images` has seed + i and can be drawn again alone; an image drawn
/// alone is byte-identical however it was asked for; every PNG says what made it.
#[test]
fn images_say_what_made_them_and_redraw_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let draw = |extra: &[&str]| {
        let base = [
            "--model",
            &model,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--quiet",
            "--negative-prompt",
            "blurry",
        ];
        ok(&run_bin("infer", &[&base[..], extra].concat()));
    };
    let two = tmp.path().join("two.png");
    draw(&[
        "--prompt",
        "a dög",
        "--num-images",
        "2",
        "--seed",
        "5",
        "--out",
        two.to_str().unwrap(),
    ]);
    let six = tmp.path().join("six.png");
    draw(&[
        "--prompt",
        "a dög",
        "--seed",
        "6",
        "--out",
        six.to_str().unwrap(),
    ]);
    let second = tmp.path().join("two-1.png");
    assert!(
        png_max_diff(&read_png(&second), &read_png(&six)) <= 1,
        "the batch's rounding only"
    );
    let text = png_text(&second);
    let params = &text["parameters"];
    assert!(
        params.starts_with("a dög\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM"),
        "{params}"
    );
    let want = format!("CFG scale: 7.5, Seed: 6, Size: 64x64, Model: {model}");
    assert!(params.contains(&want), "{params}");
    let made: serde_json::Value = serde_json::from_str(&text["magictailor"]).unwrap();
    assert_eq!(made["seed"], 6);
    assert_eq!(made["prompt"], "a dög");
    assert_eq!(made["negative_prompt"], "blurry");

    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a dög\n").unwrap();
    let many = tmp.path().join("many");
    draw(&[
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--seeds",
        "6",
        "--batch-size",
        "1",
        "--out-dir",
        many.to_str().unwrap(),
    ]);
    let cell = many.join("prompt00/seed06.png");
    assert_eq!(
        read_png(&cell),
        read_png(&six),
        "drawn alone: the same bytes"
    );
    assert!(png_text(&cell)["parameters"].contains("Seed: 6"));
}

/// One vocabulary across subcommands: `--out-dir` for folders, `--prompts-file` for
/// prompt files, lists with commas and ranges; the old spellings still work, unlisted.
#[test]
fn one_vocabulary_and_the_old_spellings_still_work() {
    let help = |sub: &str| String::from_utf8_lossy(&run_bin(sub, &["--help"]).stdout).into_owned();
    for (sub, new, old) in [
        ("train", "--out-dir", "--output-dir"),
        ("batch", "--out-dir", "--output-root"),
        ("masks", "--out-dir", "--out "),
        ("eval", "--prompts-file", "--prompts "),
        ("train", "--sample-prompts-file", "--sample-prompts "),
    ] {
        let h = help(sub);
        assert!(h.contains(new) && !h.contains(old), "{sub}: {h}");
    }
    assert!(
        help("train").contains("[default: 0,1]"),
        "lists shown as typed"
    );
    assert!(help("masks").contains("[default: 200,400,600]"));
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("old");
    let old = [
        "--instance-dir",
        pair.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--model",
        &tiny_sd(),
        "--resolution",
        "64",
        "--warmup-steps",
        "1",
        "--dsbal-steps",
        "1",
        "--sample-seeds",
        "0..2",
        "--sample-every",
        "0",
        "--quiet",
    ];
    ok(&run_bin("train", &old));
    assert!(out.join("magictailor.json").is_file());
}

/// `infer --json`: a line per image with its file, prompt and seed.
#[test]
fn infer_json_names_each_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let args = small_infer("tiny-random", "a dog", out.to_str().unwrap());
    let o = run_bin(
        "infer",
        &with_args(args, &["--num-images", "2", "--seed", "5", "--json"]),
    );
    ok(&o);
    let lines: Vec<serde_json::Value> = (String::from_utf8_lossy(&o.stdout).lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[1]["seed"].as_u64(), lines[1]["prompt"].as_str()),
        (Some(6), Some("a dog"))
    );
    assert!(Path::new(lines[1]["image"].as_str().unwrap()).is_file());
}

/// `infer` of `prompt` with `model` at 64 px in 2 steps into `out`.
fn small_infer<'a>(model: &'a str, prompt: &'a str, out: &'a str) -> Vec<&'a str> {
    let size = ["--width", "64", "--height", "64", "--steps", "2"];
    with_args(
        vec!["--model", model, "--prompt", prompt, "--out", out],
        &size,
    )
}

/// A hand-made hub cache in `cache` holding the tiny model as `owner/tiny` at `main`.
fn hub_cache(cache: &Path) {
    let repo = cache.join("models--owner--tiny");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(Path::new(&tiny_sd()), &repo.join("snapshots").join(sha));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
}

/// A command with no hub variable of the machine's, plus `vars`.
fn hub_command(subcommand: &str, args: &[&str], vars: &[(&str, &Path)]) -> std::process::Command {
    let mut c = bin_command(subcommand, args);
    for v in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(v);
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// The hub settings as Python's huggingface_hub reads them: a cache named by
/// HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE or HF_HOME/hub serves a hub id offline;
/// HF_ENDPOINT's mirror is where a download goes (and the error names it); `doctor`
/// reports the cache's variable, the endpoint and where the token comes from, never the
/// token itself.
#[test]
fn hub_settings_follow_huggingface_hub() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    hub_cache(&home.join("hub"));
    let png = dir.path().join("out.png");
    let args = [
        "--model",
        "owner/tiny",
        "--prompt",
        "a photo",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        png.to_str().unwrap(),
    ];
    let cache = home.join("hub");
    for var in [
        ("HF_HUB_CACHE", &cache),
        ("HUGGINGFACE_HUB_CACHE", &cache),
        ("HF_HOME", &home),
    ] {
        let o = hub_command("infer", &args, &[(var.0, var.1.as_path())])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}: {}", var.0, stderr(&o));
    }
    // Not in this cache, online, through a mirror that does not answer: it was asked.
    let empty = dir.path().join("empty");
    let mut c = hub_command("infer", &args, &[("HF_HUB_CACHE", &empty)]);
    let o = c
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("http://127.0.0.1:9 (HF_ENDPOINT)"),
        "{}",
        stderr(&o)
    );

    let o = hub_command("doctor", &["--json"], &[("HF_HUB_CACHE", &cache)])
        .env("HF_TOKEN", "hf_secret_value")
        .env("HF_ENDPOINT", "https://mirror.example/")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("hf_secret_value"),
        "the token is never printed"
    );
    let line = out
        .lines()
        .find(|l| l.contains("\"hub\""))
        .unwrap_or_else(|| panic!("{out}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let hub = &v["hub"];
    assert_eq!(hub["cache"], cache.to_str().unwrap());
    assert_eq!(hub["cache_source"], "HF_HUB_CACHE");
    assert_eq!(hub["endpoint"], "https://mirror.example");
    assert_eq!(hub["token_from"], "HF_TOKEN");
}

/// Without --width/--height (infer) or --resolution (train, masks), images take the
/// model's own size, as diffusers' pipelines do: its U-Net's sample_size in latent cells
/// times the VAE's factor (the tiny model with 12 cells: 96 px). A size typed, or one in a
/// `--config` file, wins.
#[test]
fn default_sizes_come_from_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-12");
    copy_dir(Path::new(&tiny_sd()), &model);
    let config = model.join("unet/config.json");
    let mut unet: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    unet["sample_size"] = 12.into();
    std::fs::write(&config, unet.to_string()).unwrap();
    let model = model.to_str().unwrap();

    let png = dir.path().join("a.png");
    let args = ["--model", model, "--prompt", "a", "--steps", "2", "--quiet"];
    ok(&run_bin(
        "infer",
        &with_args(args.to_vec(), &["--out", png.to_str().unwrap()]),
    ));
    assert_eq!(read_png(&png).dimensions(), (96, 96));
    let more = ["--width", "64", "--out", png.to_str().unwrap()];
    ok(&run_bin("infer", &with_args(args.to_vec(), &more)));
    assert_eq!(read_png(&png).dimensions(), (64, 96));

    let pair = pair_folder(dir.path(), &PairSpec::training());
    let train = |out: &Path, extra: &[&str]| {
        let mut a = vec!["--instance-dir", pair.to_str().unwrap(), "--model", model];
        a.extend([
            "--out-dir",
            out.to_str().unwrap(),
            "--quiet",
            "--warmup-steps",
            "1",
        ]);
        a.extend(["--dsbal-steps", "1", "--sample-every", "0"]);
        a.extend(extra);
        ok(&run_bin("train", &a));
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
                .unwrap();
        record["config"]["resolution"].as_u64().unwrap()
    };
    assert_eq!(train(&dir.path().join("native"), &[]), 96);
    let settings = dir.path().join("settings.json");
    std::fs::write(&settings, r#"{"resolution": 64}"#).unwrap();
    let from_file = ["--config", settings.to_str().unwrap()];
    assert_eq!(train(&dir.path().join("file"), &from_file), 64);
}
