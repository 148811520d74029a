//! Single-file checkpoints (the original SD layout A1111 and ComfyUI use), written from
//! the tiny fixture models by diffusers' own conversion script
//! (scripts/make_single_file_fixtures.py): each loads to the same model as the folder it
//! came from, bit for bit; what is not a loadable checkpoint is refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::model::loader::{SingleFileOptions, StableDiffusion};
use magictailor::model::nn::Ctx;

fn described_by(fam: &Family) -> SingleFileOptions {
    SingleFileOptions {
        model_config: Some(fam.path("tiny-sd")),
        prediction_type: None,
    }
}

fn load(model: &str, single: &SingleFileOptions, dtype: DType) -> StableDiffusion {
    StableDiffusion::load_with(model, single, &Device::Cpu, dtype)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// The outputs of every component on the parity inputs.
fn outputs(sd: &StableDiffusion, r: &std::collections::HashMap<String, Tensor>) -> Vec<Tensor> {
    let dtype = |t: &Tensor| t.to_dtype(sd.dtype).unwrap();
    let ids = r["token_ids"].to_dtype(DType::U32).unwrap();
    let text = sd.text_encoder.forward(&ids, None).unwrap();
    let ctx = dtype(&r["te_hidden"].narrow(0, 0, 2).unwrap());
    let (x, t) = (dtype(&r["unet_x"]), r["unet_t"].clone());
    let unet = sd.unet.forward(&x, &t, &ctx, Ctx::default()).unwrap();
    let decoded = sd.vae.decode(&dtype(&r["vae_z"])).unwrap();
    let mean = sd.vae.encode(&dtype(&r["vae_in"])).unwrap().mean;
    vec![text, unet, decoded, mean]
}

fn assert_identical(a: &[Tensor], b: &[Tensor], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = max_abs_diff(x, y);
        assert_eq!(
            d, 0.0,
            "{what}: output {i} (text, U-Net, VAE decode, encode) differs by {d}"
        );
    }
}

#[test]
fn single_files_load_to_the_folder_they_came_from_bit_for_bit() {
    for fam in &FAMILIES {
        let r = fam.reference();
        let folder = load(&fam.model(), &SingleFileOptions::default(), DType::F32);
        let single = load(
            &fam.arg("single.safetensors"),
            &described_by(fam),
            DType::F32,
        );
        assert_identical(&outputs(&folder, &r), &outputs(&single, &r), fam.name);
    }
    // An fp16 file (the script's --half) is the folder rounded to f16.
    let r = SD1.reference();
    let folder = load(&SD1.model(), &SingleFileOptions::default(), DType::F16);
    let half = load(
        &SD1.arg("single_fp16.safetensors"),
        &described_by(&SD1),
        DType::F16,
    );
    assert_identical(&outputs(&folder, &r), &outputs(&half, &r), "SD 1.x fp16");
}

#[test]
fn the_prediction_type_of_a_described_file_can_be_set() {
    let mut single = described_by(&SD2);
    single.prediction_type = Some("v_prediction".into());
    let sd = load(&SD2.arg("single.safetensors"), &single, DType::F32);
    assert!(sd.schedule.predicts_v());
    single.prediction_type = Some("sample".into());
    let e = StableDiffusion::load_with(
        &SD2.arg("single.safetensors"),
        &single,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .expect("sample prediction is refused");
    assert!(e.to_string().contains("prediction_type \"sample\""), "{e}");
}

fn refused(model: &str, single: &SingleFileOptions) -> String {
    match StableDiffusion::load_with(model, single, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{model} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn what_is_not_a_loadable_checkpoint_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let single = described_by(&SD1);
    // A LoRA passed as the model.
    let e = refused(&fixture("lora_kohya.safetensors"), &single);
    assert!(
        e.contains("a LoRA, not a base model") && e.contains("--lora"),
        "{e}"
    );
    // An SDXL-family file without the base's two text encoders (a refiner's layout).
    let xl = dir.path().join("xl.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ];
    let tensors: std::collections::HashMap<_, _> =
        keys.iter().map(|k| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&tensors, &xl).unwrap();
    let e = refused(xl.to_str().unwrap(), &single);
    assert!(e.contains("SDXL"), "{e}");
    // A truncated file.
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(SD1.path("single.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = refused(cut.to_str().unwrap(), &single);
    assert!(e.contains("cut.safetensors"), "{e}");
    // An SD 2.x file with the bundled configs: its weights do not tell the prediction type.
    let e = refused(
        &SD2.arg("single.safetensors"),
        &SingleFileOptions::default(),
    );
    assert!(
        e.contains("--prediction-type epsilon") && e.contains("v_prediction"),
        "{e}"
    );
    // Settings for a single file given with a diffusers folder.
    let e = refused(&SD1.model(), &single);
    assert!(
        e.contains("--model-config describes a single-file checkpoint"),
        "{e}"
    );
    // A U-Net alone: no text encoder to take prompts.
    let unet_only = dir.path().join("unet_only.safetensors");
    let t = Tensor::zeros((4, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([(keys[0].to_string(), t)]);
    candle_core::safetensors::save(&tensors, &unet_only).unwrap();
    let e = refused(unet_only.to_str().unwrap(), &single);
    assert!(e.contains("without a text encoder"), "{e}");
    // Pickle.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK").unwrap();
    let e = refused(ckpt.to_str().unwrap(), &SingleFileOptions::default());
    assert!(e.contains("pickled checkpoint"), "{e}");
    // The configs of another family: the weights do not fit, and the error says what does.
    let e = refused(&SD2.arg("single.safetensors"), &single);
    assert!(
        e.contains("do not fit the configs in") && e.contains("--model-config"),
        "{e}"
    );
}

// ---- Through the binary ---------------------------------------------------------------

/// `infer` as the reference images were drawn, with `model` args.
fn draw(fam: &Family, model: &[&str], prompt: &str, out: &std::path::Path) -> std::process::Output {
    fam.infer_like_reference(model, out, prompt)
}

#[test]
fn infer_draws_the_same_image_from_a_single_file_as_from_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    for fam in &FAMILIES {
        let (single, config) = (fam.arg("single.safetensors"), fam.model());
        let from_file = dir.path().join("file.png");
        let args = ["--model", &single, "--model-config", &config];
        ok(&draw(fam, &args, "a photo of a dog", &from_file));
        // The PNG says what the file needed.
        let made: serde_json::Value =
            serde_json::from_str(&png_text(&from_file)["magictailor"]).unwrap();
        assert_eq!(made["model_config"], config.as_str());
        let from_folder = dir.path().join("folder.png");
        ok(&draw(
            fam,
            &["--model", &config],
            "a photo of a dog",
            &from_folder,
        ));
        assert_eq!(read_png(&from_file), read_png(&from_folder), "{}", fam.name);
        let d = png_max_diff(&read_png(&from_file), &read_png(&fam.path("ddim_base.png")));
        assert!(d <= 2, "{}: {d} levels from diffusers' image", fam.name);
    }
}

/// A run on a single file records what the file needs; `infer --model-dir` reloads it
/// from the record alone, and draws what the same adapters draw on the folder.
#[test]
fn a_run_on_a_single_file_records_what_it_needs_and_infer_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let run = dir.path().join("run");
    let (single, config) = (SD1.arg("single.safetensors"), SD1.model());
    let mut args = quiet_train_args(pair.to_str().unwrap(), run.to_str().unwrap(), &single);
    args.extend([
        "--model-config",
        &config,
        "--warmup-steps",
        "2",
        "--dsbal-steps",
        "2",
    ]);
    ok(&run_bin("train", &args));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("magictailor.json")).unwrap())
            .unwrap();
    let absolute = |p: &str| {
        std::fs::canonicalize(p)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(record["base_model"], absolute(&single));
    assert_eq!(record["model_config"], absolute(&config));
    assert_eq!(record["config"]["model_config"], config.as_str());

    let png = |name: &str| dir.path().join(name);
    let run_dir = run.to_str().unwrap();
    ok(&draw(
        &SD1,
        &["--model-dir", run_dir],
        "<v0> with <v1>",
        &png("file.png"),
    ));
    let on_folder = ["--model-dir", run_dir, "--model", &config];
    ok(&draw(
        &SD1,
        &on_folder,
        "<v0> with <v1>",
        &png("folder.png"),
    ));
    assert_eq!(read_png(&png("file.png")), read_png(&png("folder.png")));
    // The settings describe --model: without it they are refused, not ignored.
    let o = draw(
        &SD1,
        &["--model-dir", run_dir, "--model-config", &config],
        "a",
        &png("x.png"),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("pass it too"),
        "{}",
        stderr(&o)
    );
    assert!(!png("x.png").exists());
}

#[test]
fn single_file_settings_for_a_folder_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let run = dir.path().join("run");
    let model = SD1.model();
    let mut args = quiet_train_args(pair.to_str().unwrap(), run.to_str().unwrap(), &model);
    args.extend(["--prediction-type", "v_prediction"]);
    let o = run_bin("train", &args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--prediction-type describes a single-file checkpoint"),
        "{}",
        stderr(&o)
    );
    assert!(!run.exists(), "nothing written");
    // Before any model is read: with a model that does not exist, the flag is what is
    // refused, in every command that takes it.
    let absent = dir.path().join("no-model");
    let absent = absent.to_str().unwrap();
    let png = dir.path().join("x.png");
    let flag = ["--prediction-type", "epsilon"];
    let refusals = [
        (
            "infer",
            vec![
                "--model",
                absent,
                "--prompt",
                "a",
                "--out",
                png.to_str().unwrap(),
            ],
        ),
        (
            "masks",
            vec!["--model", absent, "--instance-dir", pair.to_str().unwrap()],
        ),
        (
            "train",
            quiet_train_args(pair.to_str().unwrap(), run.to_str().unwrap(), absent),
        ),
    ];
    for (command, mut args) in refusals {
        args.extend(flag);
        let o = run_bin(command, &args);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.contains("--prediction-type describes"),
            "{command}: {e}"
        );
    }
    assert!(!run.exists() && !png.exists() && !pair.join("masks/preview.png").exists());
}

/// The bundled SD 1.x configs, with the tokenizer from a hand-made hub cache of the
/// family's repo: the tiny file does not fit them, and the error says what does.
#[test]
fn bundled_configs_take_the_tokenizer_from_the_hub_cache_and_name_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let repo = cache.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &SD1.path("tiny-sd/tokenizer"),
        &repo.join("snapshots").join(sha).join("tokenizer"),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let out = dir.path().join("never.png");
    let o = draw(
        &SD1,
        &["--model", &SD1.arg("single.safetensors")],
        "a",
        &out,
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    // Without the cache the tokenizer cannot be had offline.
    assert!(
        e.contains("stable-diffusion-v1-5") && e.contains("--model-config"),
        "{e}"
    );
    let mut c = bin_command("infer", &[]);
    let latents = SD1.arg("init_latents.safetensors");
    let single = SD1.arg("single.safetensors");
    c.args([
        "--model",
        &single,
        "--prompt",
        "a",
        "--init-latents",
        &latents,
    ]);
    c.args([
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let o = c.env("HF_HUB_CACHE", &cache).output().unwrap();
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("do not fit the bundled SD 1.x configs") && e.contains("--model-config DIR"),
        "{e}"
    );
    assert!(!out.exists());
}

/// Adapters trained on one family do not load on another: SD 1.x's 1x1-conv projection
/// adapters on SD 2.x's linear ones are refused, naming the file.
#[test]
fn an_sd1_lora_on_an_sd2_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let lora = SD1.arg("lora_peft.safetensors");
    let o = SD2.infer_like_reference(&["--model", &SD2.model(), "--lora", &lora], &out, "a");
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("lora_peft.safetensors"),
        "{e}"
    );
    assert!(!e.contains("panicked") && !out.exists(), "{e}");
}

/// SDXL's single file (written by diffusers' SDXL conversion script): both text encoders,
/// the projection stored transposed, the U-Net's `label_emb`, read to the folder's model
/// bit for bit; `infer` from it draws the folder's image exactly.
#[test]
fn an_sdxl_single_file_loads_to_its_folder_bit_for_bit() {
    let folder = fixtures().join("sdxl/tiny-sdxl");
    let single = SingleFileOptions {
        model_config: Some(folder.clone()),
        prediction_type: None,
    };
    let file = fixture("sdxl/single.safetensors");
    let a = load(
        folder.to_str().unwrap(),
        &SingleFileOptions::default(),
        DType::F32,
    );
    let b = load(&file, &single, DType::F32);
    assert!(b.is_sdxl());
    let r =
        candle_core::safetensors::load(fixtures().join("sdxl/parity.safetensors"), &Device::Cpu)
            .unwrap();
    let outputs = |sd: &StableDiffusion| -> Vec<Tensor> {
        let w = magictailor::infer::Weights {
            sd,
            lora: None,
            tuned: None,
            extra_rows: None,
            extra_rows_2: None,
            token_table: None,
            token_table_2: None,
            vico: None,
        };
        let (hidden, pooled) = w.encode_text(&["a photo of a dog", ""]).unwrap();
        let added = magictailor::model::nn::AddedCond {
            text_embeds: r["unet_text_embeds"].clone(),
            time_ids: r["unet_time_ids"].clone(),
        };
        let ctx = Ctx {
            added: Some(&added),
            ..Ctx::default()
        };
        let unet = sd
            .unet
            .forward(&r["unet_x"], &r["unet_t"], &r["unet_ctx"], ctx)
            .unwrap();
        let decoded = sd.vae.decode(&r["unet_x"]).unwrap();
        vec![hidden, pooled.unwrap(), unet, decoded]
    };
    assert_identical(&outputs(&a), &outputs(&b), "SDXL");

    let dir = tempfile::tempdir().unwrap();
    let draw = |model: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "--prompt",
            "a photo of a dog",
            "--steps",
            "3",
            "--width",
            "64",
        ];
        args.extend(["--height", "64", "--quiet", "--out", out.to_str().unwrap()]);
        args.extend(model);
        ok(&run_bin("infer", &args));
        read_png(out)
    };
    let config = folder.to_string_lossy().into_owned();
    let from_file = draw(
        &["--model", &file, "--model-config", &config],
        &dir.path().join("f.png"),
    );
    let from_folder = draw(&["--model", &config], &dir.path().join("d.png"));
    assert_eq!(from_file, from_folder);
}
