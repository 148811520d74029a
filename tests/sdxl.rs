//! SDXL's pieces against diffusers/transformers on a tiny SDXL pipeline
//! (scripts/make_sdxl_fixtures.py): the two tokenizers (padding differently), each text
//! encoder's penultimate hidden states, the second's projected pooled output, and the
//! U-Net with its added size-and-text conditioning; and `infer`'s whole SDXL path
//! against the SDXL pipeline's image. Training on SDXL: each method's step against torch's
//! (scripts/make_sdxl_*_fixture.py), its files, what draws them, resume, and the
//! refusals (Break-A-Scene's full fine-tune, `--released-script`).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use magictailor::model::clip::ClipTextModel;
use magictailor::model::config::{read_json, ClipTextConfig, UNetConfig};
use magictailor::model::nn::{AddedCond, Ctx};
use magictailor::model::tokenizer::ClipTokenizer;
use magictailor::model::unet::UNet;
use magictailor::testkit::tolerance::max_abs_diff;

fn dir(component: &str) -> PathBuf {
    fixtures().join("sdxl/tiny-sdxl").join(component)
}

fn weights(component: &str, file: &str) -> VarBuilder<'static> {
    let f = dir(component).join(file);
    // SAFETY: read-only test fixtures.
    unsafe { VarBuilder::from_mmaped_safetensors(&[f], DType::F32, &Device::Cpu) }.unwrap()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("sdxl/parity.safetensors"), &Device::Cpu)
        .unwrap()
}

const PROMPTS: [&str; 3] = ["a photo of a dog", "", "the red cat, in snow"];

#[test]
fn both_text_encoders_match_transformers() {
    let r = reference();
    for (i, (tok, te)) in [
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
    ]
    .iter()
    .enumerate()
    {
        let n = i + 1;
        let cfg: ClipTextConfig = read_json(&dir(te).join("config.json")).unwrap();
        let tokenizer = ClipTokenizer::load(&dir(tok), cfg.vocab_size, 77).unwrap();
        let ids: Vec<u32> = PROMPTS
            .iter()
            .flat_map(|p| tokenizer.encode(p).unwrap())
            .collect();
        let ids = Tensor::from_vec(ids, (3, 77), &Device::Cpu).unwrap();
        let want_ids = r[&format!("ids_{n}")].to_dtype(DType::U32).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            want_ids.to_vec2::<u32>().unwrap(),
            "{tok}"
        );
        let model = ClipTextModel::load(&weights(te, "model.safetensors"), &cfg).unwrap();
        let states = model.forward_states(&ids, None, None).unwrap();
        let d = max_abs_diff(states.penultimate(), &r[&format!("penultimate_{n}")]);
        assert!(d < 2e-5, "{te}: penultimate hidden states max |diff| {d}");
        if n == 2 {
            let eos = *ids.to_vec2::<u32>().unwrap()[1].get(1).unwrap();
            let pooled = model.pooled(&states.last, &ids, eos).unwrap();
            let d = max_abs_diff(&pooled, &r["pooled_2"]);
            assert!(d < 2e-5, "pooled projection max |diff| {d}");
        }
    }
    // The first pads with end-of-text, the second with "!".
    let last = |k: &str| r[k].to_vec2::<i64>().unwrap()[0][76];
    assert_ne!(last("ids_1"), last("ids_2"));
}

#[test]
fn the_unet_with_added_conditioning_matches_diffusers() {
    let r = reference();
    let cfg: UNetConfig = read_json(&dir("unet").join("config.json")).unwrap();
    cfg.validate(&dir("unet").join("config.json")).unwrap();
    let unet = UNet::load(
        &weights("unet", "diffusion_pytorch_model.safetensors"),
        &cfg,
    )
    .unwrap();
    let added = AddedCond {
        text_embeds: r["unet_text_embeds"].clone(),
        time_ids: r["unet_time_ids"].clone(),
    };
    let ctx = Ctx {
        added: Some(&added),
        ..Ctx::default()
    };
    let got = unet
        .forward(&r["unet_x"], &r["unet_t"], &r["unet_ctx"], ctx)
        .unwrap();
    let d = max_abs_diff(&got, &r["unet_out"]);
    assert!(
        d < 5e-5,
        "SDXL U-Net max |diff| {d} (values up to {})",
        max_abs(&r["unet_out"])
    );
    // Without its added conditioning the U-Net refuses, rather than drawing something else.
    let e = unet.forward(&r["unet_x"], &r["unet_t"], &r["unet_ctx"], Ctx::default());
    assert!(e.unwrap_err().to_string().contains("needs the pooled text"));
}

fn tiny_sdxl() -> String {
    fixtures()
        .join("sdxl/tiny-sdxl")
        .to_string_lossy()
        .into_owned()
}

/// `infer` on the SDXL folder as the pipeline drew `ddim_base.png`: 10 DDIM steps,
/// guidance 7.5, 64 px, the recorded latents.
fn infer_sdxl(prompt: &str, extra: &[&str], out: &Path) -> std::process::Output {
    let model = tiny_sdxl();
    infer_sdxl_run(&[&["--model", model.as_str()], extra].concat(), prompt, out)
}

/// The whole SDXL text-to-image path: both encoders, the zero negative conditioning of
/// an empty negative prompt, the size conditioning, the VAE's own scaling factor.
#[test]
fn infer_draws_diffusers_sdxl_image() {
    let dir = tempfile::tempdir().unwrap();
    let want = read_png(&fixtures().join("sdxl/ddim_base.png"));
    let out = dir.path().join("xl.png");
    ok(&infer_sdxl("a photo of a dog", &[], &out));
    let d = png_max_diff(&read_png(&out), &want);
    assert!(d <= 2, "SDXL image: {d} levels from diffusers'");
    // f16 weights, the VAE kept in f32 as the pipeline's force_upcast does.
    ok(&infer_sdxl("a photo of a dog", &["--dtype", "f16"], &out));
    let d = png_max_diff(&read_png(&out), &want);
    assert!(
        d <= 4,
        "SDXL f16 image: {d} levels from diffusers' f32 (measured 1)"
    );
}

/// An SDXL embedding (`clip_l` and `clip_g`, as diffusers and A1111 store one) gives its
/// word a row in each text encoder: the prompt's features, the pooled projection and the
/// image as diffusers' `load_textual_inversion` into both encoders gives them
/// (scripts/make_sdxl_embeds_fixture.py); an SD 1.x/2.x embedding is refused by name.
#[test]
fn an_sdxl_embedding_matches_diffusers_textual_inversion() {
    use magictailor::infer::{Personalized, Sources};
    let r = candle_core::safetensors::load(
        fixtures().join("sdxl/embeds_parity.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let embeds = fixtures().join("sdxl/v0.safetensors");
    let src = Sources {
        model: tiny_sdxl(),
        embeds: Some(embeds.clone()),
        ..Default::default()
    };
    let p = Personalized::load(&src, &Device::Cpu, DType::F32).unwrap();
    let prompt = "a photo of <v0>, in snow";
    let (hidden, pooled) = p.weights().encode_text(&[prompt]).unwrap();
    let d = max_abs_diff(&hidden, &r["prompt_embeds"]);
    let e = max_abs_diff(&pooled.unwrap(), &r["pooled"]);
    eprintln!("SDXL embedding: features {d:e}, pooled {e:e} from diffusers'");
    assert!(d < 1e-5 && e < 1e-5, "features {d}, pooled {e}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("xl.png");
    ok(&infer_sdxl(
        prompt,
        &["--embeds", embeds.to_str().unwrap()],
        &out,
    ));
    let want = read_png(&fixtures().join("sdxl/ddim_embeds.png"));
    let d = png_max_diff(&read_png(&out), &want);
    eprintln!("SDXL image with an embedding: {d} level(s) from diffusers'");
    assert!(
        d <= 2,
        "SDXL image with an embedding: {d} levels from diffusers'"
    );
    let sd2 = fixtures().join("learned_embeds.safetensors");
    let o = infer_sdxl(prompt, &["--embeds", sd2.to_str().unwrap()], &out);
    assert!(stderr(&o).contains("clip_l and clip_g"), "{}", stderr(&o));
}

/// A LoRA in kohya's SDXL naming (the original layout's `input_blocks_4_1_...`, as
/// sd-scripts writes SDXL adapters) draws what diffusers draws after its own kohya
/// conversion (scripts/make_sdxl_lora_fixture.py: 220 modules, alpha 8 on rank 4; the
/// image is 76 levels from the plain one); the same file on SD 2.x is refused by name.
#[test]
fn a_kohya_sdxl_lora_draws_as_diffusers_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("sdxl/lora_kohya_sdxl.safetensors");
    let lora = lora.to_str().unwrap();
    let out = dir.path().join("xl.png");
    ok(&infer_sdxl("a photo of a dog", &["--lora", lora], &out));
    let want = read_png(&fixtures().join("sdxl/ddim_lora_kohya.png"));
    let d = png_max_diff(&read_png(&out), &want);
    eprintln!("SDXL image with a kohya LoRA: {d} level(s) from diffusers'");
    assert!(
        d <= 2,
        "SDXL image with a kohya LoRA: {d} levels from diffusers'"
    );
    let (png, sd2) = (dir.path().join("sd2.png"), tiny_sd());
    let mut a = vec!["--model", &sd2, "--prompt", "a dog", "--steps", "2"];
    a.extend(["--width", "64", "--height", "64", "--quiet", "--lora", lora]);
    a.extend(["--out", png.to_str().unwrap()]);
    let o = run_bin("infer", &a);
    assert!(
        !o.status.success() && stderr(&o).contains("lora_kohya_sdxl"),
        "{}",
        stderr(&o)
    );
}

/// An SDXL repo in the hub cache brings its second text encoder and tokenizer.
#[test]
fn an_sdxl_hub_repo_loads_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hub/models--owner--xl");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(Path::new(&tiny_sdxl()), &repo.join("snapshots").join(sha));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let out = dir.path().join("xl.png");
    let args = [
        "--model", "owner/xl", "--prompt", "a dog", "--steps", "2", "--quiet",
    ];
    let o = bin_command("infer", &args)
        .args(["--out", out.to_str().unwrap()])
        .env("HF_HUB_CACHE", dir.path().join("hub"))
        .output()
        .unwrap();
    ok(&o);
    // Its own size: sample_size 16 x 8.
    assert_eq!(read_png(&out).dimensions(), (128, 128));
}

/// `train --released-script` on the tiny SDXL trains each text encoder's whole token table
/// (with weight decay, as the script trains its one): both drifted tables are written
/// (`token_embedding.safetensors`, `token_embedding_2.safetensors`), every row of each has
/// moved, the folder (its tables read back) draws what its last checkpoint draws, a run
/// killed after step 3 resumes to byte-identical tables, and the folder without its second
/// table is refused.
#[test]
fn the_released_script_trains_both_token_tables_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let args = |out: &Path| -> Vec<String> {
        let run = short_run_args(&pair, out.to_str().unwrap(), &model);
        (with_args(run, &["--released-script"]).into_iter())
            .map(String::from)
            .collect()
    };
    let run = dir.path().join("run");
    let a = args(&run);
    ok(&run_bin(
        "train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let sd = magictailor::model::loader::StableDiffusion::load(&model, &Device::Cpu, DType::F32)
        .unwrap();
    let bases = [
        sd.text_encoder.token_table(),
        sd.text_encoder_2.as_ref().unwrap().0.token_table(),
    ];
    let files = [
        "token_embedding.safetensors",
        "token_embedding_2.safetensors",
    ];
    for (file, base) in files.iter().zip(bases) {
        let t = candle_core::safetensors::load(run.join(file), &Device::Cpu).unwrap();
        let table = &t["text_model.embeddings.token_embedding.weight"];
        assert_eq!(table.dims(), base.dims(), "{file}");
        // Weight decay moves every row, words or not.
        let moved = (table - base).unwrap().abs().unwrap().max(1).unwrap();
        let still = moved.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(still.iter().all(|&d| d > 0.0), "{file}: a row did not move");
    }
    draws_as_its_last_checkpoint(dir.path(), &run, 8, "<v0> with <v1>");
    let killed = dir.path().join("killed");
    let a = args(&killed);
    let files = [files[0], files[1], "pytorch_lora_weights.safetensors"];
    killed_after_step_resumes_alike(
        &run,
        &killed,
        3,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &files,
    );
    // A folder missing its second table is refused by name, and nothing is drawn.
    std::fs::remove_file(run.join(files[1])).unwrap();
    let out = dir.path().join("refused.png");
    let o = infer_sdxl_run(
        &["--model-dir", run.to_str().unwrap()],
        "<v0> with <v1>",
        &out,
    );
    let says = stderr(&o);
    assert!(!o.status.success() && !out.exists(), "{says}");
    assert!(
        says.contains(files[0]) && says.contains("the model is SDXL"),
        "{says}"
    );
}

/// `train` (MagicTailor) on the tiny SDXL, with masks made from its attention: adapters
/// named by SDXL's original layout in the kohya file, each word's rows in both encoders;
/// the folder, its last checkpoint, and the base with its kohya file and its pair of word
/// files draw the same image; a run killed
/// after step 3 (in the warm-up) resumes to byte-identical files.
#[test]
fn magictailor_trains_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = PairSpec::training();
    spec.masks = false;
    let pair = pair_folder(dir.path(), &spec);
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let args = |out: &Path| -> Vec<String> {
        let out = out.to_str().unwrap();
        (short_run_args(&pair, out, &model).into_iter())
            .map(String::from)
            .collect()
    };
    let run = dir.path().join("run");
    let a = args(&run);
    ok(&run_bin(
        "train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("magictailor.json")).unwrap())
            .unwrap();
    assert_eq!(
        record["masks"]["method"], "attention",
        "{}",
        record["masks"]
    );
    let kohya =
        candle_core::safetensors::load(run.join("lora_kohya.safetensors"), &Device::Cpu).unwrap();
    assert!(
        kohya.keys().all(|k| !k.contains("down_blocks")),
        "original-layout names"
    );
    for f in ["learned_embeds.safetensors", "learned_embeds_2.safetensors"] {
        let t = candle_core::safetensors::load(run.join(f), &Device::Cpu).unwrap();
        assert_eq!(t.len(), 2, "{f}");
    }
    let prompt = "<v0> with <v1>";
    let drawn = draws_as_its_last_checkpoint(dir.path(), &run, 8, prompt);
    // The base with the run's kohya file and diffusers' pair of word files (`--embeds`
    // names the first; the second is found beside it).
    let (lora, embeds) = (
        run.join("lora_kohya.safetensors"),
        run.join("learned_embeds.safetensors"),
    );
    let files = dir.path().join("files.png");
    let extra = [
        "--lora",
        lora.to_str().unwrap(),
        "--embeds",
        embeds.to_str().unwrap(),
    ];
    ok(&infer_sdxl(prompt, &extra, &files));
    assert_eq!(png_max_diff(&read_png(&drawn), &read_png(&files)), 0);
    // Its record names the second file it read.
    let record: serde_json::Value = serde_json::from_str(&png_text(&files)["magictailor"]).unwrap();
    let second = run.join("learned_embeds_2.safetensors");
    assert_eq!(record["embeds_2"], second.to_str().unwrap(), "{record}");
    // The adapters trained (B starts at 0).
    let up = (kohya.iter())
        .find(|(k, _)| k.ends_with("lora_up.weight"))
        .unwrap()
        .1;
    assert!(magictailor::testkit::tolerance::max_abs(up) > 0.0);
    // Killed after step 3: the same files.
    let killed = dir.path().join("killed");
    let a = args(&killed);
    killed_after_step_resumes_alike(
        &run,
        &killed,
        3,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "pytorch_lora_weights.safetensors",
            "learned_embeds.safetensors",
            "learned_embeds_2.safetensors",
        ],
    );
    // For scripts/check_rust_exports.py: diffusers draws it from the kohya file and the
    // A1111 words.
    leave_check(
        &run,
        "sdxl-magictailor",
        &["lora_kohya.safetensors"],
        &drawn,
        prompt,
    );
}

/// `infer --model-dir run` of `prompt` draws exactly what `--checkpoint last` draws
/// (both into `tmp`, named after the run); returns the folder's image.
fn draws_as_its_last_checkpoint(tmp: &Path, run: &Path, last: usize, prompt: &str) -> PathBuf {
    let name = run.file_name().unwrap().to_string_lossy();
    let (folder, ckpt) = (
        tmp.join(format!("{name}.png")),
        tmp.join(format!("{name}-last.png")),
    );
    let (run, last) = (run.to_str().unwrap(), last.to_string());
    ok(&infer_sdxl_run(&["--model-dir", run], prompt, &folder));
    let from_checkpoint = ["--model-dir", run, "--checkpoint", &last];
    ok(&infer_sdxl_run(&from_checkpoint, prompt, &ckpt));
    let d = png_max_diff(&read_png(&folder), &read_png(&ckpt));
    assert_eq!(d, 0, "{run}: the folder vs its last checkpoint");
    folder
}

/// Leaves a run's `files`, its A1111 words, `infer`'s image and its prompt in
/// `target/tmp/{name}-check/` (returned), for scripts/check_rust_exports.py to draw with
/// diffusers.
fn leave_check(run: &Path, name: &str, files: &[&str], png: &Path, prompt: &str) -> PathBuf {
    let check = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-check"));
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(check.join("embeddings")).unwrap();
    let words = ["embeddings/v0.safetensors", "embeddings/v1.safetensors"];
    for f in files.iter().chain(&words) {
        std::fs::copy(run.join(f), check.join(f)).unwrap();
    }
    std::fs::copy(png, check.join("infer.png")).unwrap();
    std::fs::write(check.join("prompt.txt"), prompt).unwrap();
    check
}

/// `train --method custom-diffusion` and `--method clic` on the tiny SDXL: the matrices
/// file tunes SDXL's cross-attentions (context width 64 = 32 + 32), each word has a row in
/// each encoder, and the folder draws what its last checkpoint draws.
#[test]
fn the_tuned_methods_train_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    for (method, tuned, prompt) in [
        ("custom-diffusion", 44, "photo of a <v0> with <v1>"),
        ("clic", 110, "a photo of <v0> with <v1>"),
    ] {
        let run = dir.path().join(method);
        let run_s = run.to_str().unwrap();
        let more = ["--method", method, "--steps", "3", "--lr", "5e-3"];
        ok(&run_bin(
            "train",
            &with_args(quiet_train_args(&pair, run_s, &model), &more),
        ));
        let file = "pytorch_custom_diffusion_weights.safetensors";
        let t = candle_core::safetensors::load(run.join(file), &Device::Cpu).unwrap();
        let to_k = (t.iter())
            .find(|(k, _)| k.ends_with("attn2.processor.to_k_custom_diffusion.weight"))
            .unwrap();
        assert_eq!(to_k.1.dim(1).unwrap(), 64, "{}", to_k.0);
        assert_eq!(
            t.values().filter(|v| v.elem_count() > 0).count(),
            tuned,
            "{method}"
        );
        for f in ["learned_embeds.safetensors", "learned_embeds_2.safetensors"] {
            let e = candle_core::safetensors::load(run.join(f), &Device::Cpu).unwrap();
            assert_eq!(e.len(), 2, "{method}: {f}");
        }
        let drawn = draws_as_its_last_checkpoint(dir.path(), &run, 3, prompt);
        leave_check(&run, &format!("sdxl-{method}"), &[file], &drawn, prompt);
    }
}

/// Textual Inversion's SDXL step (scripts/make_sdxl_ti_fixture.py: two images, each word
/// with a row in each encoder, the masked loss) against torch's: the prompts as both
/// tokenizers give them, the loss, and both rows' gradients.
#[test]
fn an_sdxl_textual_inversion_step_matches_torch() {
    use magictailor::train::method::LossWeights;
    use magictailor::train::objective::{step_losses, Online, TextParams};
    let (f, sd) = (step_fixture("ti_step.safetensors", None), sdxl_with_words());
    let (batch, noised) = step_inputs(&f, &sd, &["a photo of <v0>", "a photo of <v1>"], &[0, 1]);
    let rows = fixture_rows(&f);
    let text = TextParams {
        rows: rows[0].as_tensor(),
        table: None,
        rows_2: Some(rows[1].as_tensor()),
        table_2: None,
    };
    let none = magictailor::model::lora::LoraSet::default();
    let w = LossWeights::default();
    let l = step_losses(&sd, &batch, &noised, Online::lora(&none), text, None, w).unwrap();
    let (loss, want): (f32, f32) = (l.loss.to_scalar().unwrap(), f["loss"].to_scalar().unwrap());
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs {want}");
    let grads = l.loss.backward().unwrap();
    let worst = worst_gradient(&grads, &f, row_grads(&rows));
    eprintln!("SDXL TI step: worst row gradient error {worst:?}");
    assert!(worst.0 < 1e-4, "{worst:?}");
}

/// `train --method ti` on the tiny SDXL pipeline: both rows of each word train; the
/// folder holds diffusers' two files and A1111/ComfyUI's SDXL embeddings (clip_l,
/// clip_g), which `infer --embeds` reads to the folder's image; the last checkpoint draws
/// the same; a run killed after step 2 resumes to the same files.
#[test]
fn textual_inversion_trains_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let run = dir.path().join("run");
    let steps = [
        "--method",
        "ti",
        "--steps",
        "3",
        "--lr",
        "5e-3",
        "--checkpoint-every",
        "1",
    ];
    let args = |out: &Path| {
        let mut a = quiet_train_args(&pair, out.to_str().unwrap(), &model);
        a.extend(steps);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let a = args(&run);
    ok(&run_bin(
        "train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    for f in ["learned_embeds.safetensors", "learned_embeds_2.safetensors"] {
        let t = candle_core::safetensors::load(run.join(f), &Device::Cpu).unwrap();
        assert_eq!(t.len(), 2, "{f}");
    }
    let v0 = run.join("embeddings/v0.safetensors");
    let a1111 = candle_core::safetensors::load(&v0, &Device::Cpu).unwrap();
    assert_eq!(a1111["clip_l"].dims(), [1, 32]);
    assert_eq!(a1111["clip_g"].dims(), [1, 32]);
    // Both encoders' rows moved off their class words.
    let c1 = candle_core::safetensors::load(
        run.join("checkpoints/step-000001.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let c3 = candle_core::safetensors::load(
        run.join("checkpoints/step-000003.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for k in ["rows", "rows_2"] {
        assert!(max_abs_diff(&c1[k], &c3[k]) > 0.0, "{k} did not train");
    }
    let prompt = "a photo of <v0>";
    let (a, b, c) = (
        dir.path().join("a.png"),
        dir.path().join("b.png"),
        dir.path().join("c.png"),
    );
    let run_s = run.to_str().unwrap();
    ok(&infer_sdxl_run(&["--model-dir", run_s], prompt, &a));
    ok(&infer_sdxl(prompt, &["--embeds", v0.to_str().unwrap()], &b));
    ok(&infer_sdxl_run(
        &["--model-dir", run_s, "--checkpoint", "3"],
        prompt,
        &c,
    ));
    let (a, b, c) = (read_png(&a), read_png(&b), read_png(&c));
    assert_eq!(png_max_diff(&a, &b), 0, "the folder vs its A1111 file");
    assert_eq!(png_max_diff(&a, &c), 0, "the folder vs its last checkpoint");
    // On a one-encoder model (SD 1.x's rows are as wide as SDXL's first encoder's), the
    // second encoder's rows are refused, not dropped: from the folder and a checkpoint.
    let sd = tiny_sd();
    for (extra, names) in [
        (vec!["--model-dir", run_s], "learned_embeds_2.safetensors"),
        (
            vec!["--model-dir", run_s, "--checkpoint", "3"],
            "step-000003",
        ),
    ] {
        let out = dir.path().join("refused.png");
        let o = infer_sdxl_run(&with_args(extra, &["--model", &sd]), prompt, &out);
        let says = stderr(&o);
        assert!(!o.status.success() && !out.exists(), "{says}");
        assert!(
            says.contains(names) && says.contains("SDXL's second text encoder"),
            "{says}"
        );
    }
    // Killed after step 2: the same files.
    let killed = dir.path().join("killed");
    let a = args(&killed);
    killed_after_step_resumes_alike(
        &run,
        &killed,
        2,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &["learned_embeds.safetensors", "learned_embeds_2.safetensors"],
    );
}

/// `infer` from the recorded latents as `infer_sdxl`, the model (a base or a trained
/// folder) named by `extra`.
fn infer_sdxl_run(extra: &[&str], prompt: &str, out: &Path) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("latents.safetensors");
    let lat = reference()["init_latents"].clone();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), lat)]),
        &latents,
    )
    .unwrap();
    let mut args = vec!["--prompt", prompt, "--steps", "10", "--guidance", "7.5"];
    args.extend(["--width", "64", "--height", "64", "--quiet"]);
    args.extend([
        "--init-latents",
        latents.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend(extra);
    run_bin("infer", &args)
}

/// `train --method dreambooth` on the tiny SDXL: adapters on the attention projections,
/// the identifiers standing for the words in both encoders; the folder's peft file and
/// its kohya file (in SDXL's original-layout names, as sd-scripts writes them) draw what
/// the folder draws, and the base alone draws something else.
#[test]
fn dreambooth_lora_trains_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let run = dir.path().join("run");
    let mut a = quiet_train_args(&pair, run.to_str().unwrap(), &model);
    a.extend(["--method", "dreambooth", "--steps", "2", "--lr", "1e-2"]);
    ok(&run_bin("train", &a));
    let kohya = run.join("lora_kohya.safetensors");
    let keys = candle_core::safetensors::load(&kohya, &Device::Cpu).unwrap();
    let original = [
        "lora_unet_input_blocks_",
        "lora_unet_middle_block_",
        "lora_unet_output_blocks_",
    ];
    assert!(!keys.is_empty());
    assert!(
        keys.keys()
            .all(|k| original.iter().any(|o| k.starts_with(o))),
        "{:?}",
        keys.keys().next()
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("magictailor.json")).unwrap())
            .unwrap();
    let text = record["aliases"]["<v0>"].as_str().unwrap().to_string();
    let prompt = format!("a photo of {text}");
    let png = |n: &str| dir.path().join(n);
    let run_s = run.to_str().unwrap();
    ok(&infer_sdxl_run(
        &["--model-dir", run_s],
        "a photo of <v0>",
        &png("dir.png"),
    ));
    let peft = run.join("pytorch_lora_weights.safetensors");
    for (file, name) in [(&peft, "peft.png"), (&kohya, "kohya.png")] {
        ok(&infer_sdxl(
            &prompt,
            &["--lora", file.to_str().unwrap()],
            &png(name),
        ));
        let d = png_max_diff(&read_png(&png("dir.png")), &read_png(&png(name)));
        assert_eq!(d, 0, "{name} vs the folder");
    }
    ok(&infer_sdxl(&prompt, &[], &png("base.png")));
    assert!(png_max_diff(&read_png(&png("dir.png")), &read_png(&png("base.png"))) > 0);
    // For scripts/check_rust_exports.py: diffusers' own kohya and peft loaders draw it.
    let check = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdxl-dreambooth-check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    for f in ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"] {
        std::fs::copy(run.join(f), check.join(f)).unwrap();
    }
    std::fs::copy(png("dir.png"), check.join("infer.png")).unwrap();
    std::fs::write(check.join("prompt.txt"), &prompt).unwrap();
}

/// DreamBooth-LoRA's SDXL step (scripts/make_sdxl_dreambooth_fixture.py, after
/// `train_dreambooth_lora_sdxl.py` with the masked loss): one image of "a photo of sks
/// person", adapters on every attention's q/k/v/out; the loss and every adapter
/// gradient against torch's.
#[test]
fn an_sdxl_dreambooth_step_matches_torch() {
    use magictailor::train::method::{LossWeights, ATTENTION_PROJECTIONS};
    use magictailor::train::objective::{step_losses, Online, TextParams};
    use magictailor::train::setup::lora_targets;
    let (f, sd) = (
        step_fixture("dreambooth_step.safetensors", None),
        sdxl_with_words(),
    );
    let (batch, noised) = step_inputs(&f, &sd, &["a photo of sks person"], &[0]);
    let lora = fixture_lora(&f, &lora_targets(&sd, Some(&ATTENTION_PROJECTIONS)), "");
    assert_eq!(lora.modules.len(), 176, "the same adapted layers");
    let none = Tensor::zeros((0, 32), DType::F32, &Device::Cpu).unwrap();
    let text = TextParams {
        rows: &none,
        table: None,
        rows_2: Some(&none),
        table_2: None,
    };
    let (set, w) = (lora.as_set(), LossWeights::default());
    let l = step_losses(&sd, &batch, &noised, Online::lora(&set), text, None, w).unwrap();
    let (loss, want): (f32, f32) = (l.loss.to_scalar().unwrap(), f["loss"].to_scalar().unwrap());
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs {want}");
    let grads = l.loss.backward().unwrap();
    let worst = worst_gradient(&grads, &f, adapter_grads(&lora));
    eprintln!("SDXL DreamBooth step: loss {loss} vs {want}, worst gradient error {worst:?}");
    assert!(worst.0 < 1e-4, "{worst:?}");
}

/// A reference step's batch and noised latents: `prompts` (image i of sample
/// `sample_of[i]`), their
/// ids by both tokenizers checked against the fixture's, each word at position 4 (where
/// one stands); the pixels are unused, as the latents are given.
fn step_inputs(
    f: &std::collections::HashMap<String, Tensor>,
    sd: &magictailor::model::loader::StableDiffusion,
    prompts: &[&str],
    sample_of: &[usize],
) -> (
    magictailor::train::objective::Batch,
    magictailor::train::objective::Noised,
) {
    use magictailor::train::objective::{Batch, Noised};
    let dev = Device::Cpu;
    let b = prompts.len();
    let ids = |tok: &ClipTokenizer, want: &Tensor| {
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| tok.encode(p).unwrap())
            .collect();
        let want: Vec<u32> = (want.to_dtype(DType::U32).unwrap().flatten_all().unwrap())
            .to_vec1()
            .unwrap();
        assert_eq!(ids, want, "token ids");
        Tensor::from_vec(ids, (b, 77), &dev).unwrap()
    };
    let batch = Batch {
        pixels: Tensor::zeros(1, DType::F32, &dev).unwrap(),
        masks: f["masks"].clone(),
        ids: ids(&sd.tokenizer, &f["ids_1"]),
        ids_2: Some(ids(&sd.text_encoder_2.as_ref().unwrap().1, &f["ids_2"])),
        token_pos: vec![4; b],
        sample_of: sample_of.to_vec(),
        n_samples: sample_of.iter().max().map_or(0, |m| m + 1),
        roi: None,
        prior: 0,
        reference: None,
        posterior: None,
    };
    let t: Vec<i64> = f["t"].to_vec1().unwrap();
    let noised = Noised {
        z_t: f["z_t"].clone(),
        eps: f["eps"].clone(),
        target: f["eps"].clone(),
        timesteps: t.iter().map(|&x| x as usize).collect(),
        masks: f["masks"].clone(),
        reference: None,
    };
    (batch, noised)
}

type Tensors = std::collections::HashMap<String, Tensor>;

/// The tiny SDXL in f32, with `<v0>` and `<v1>` in both tokenizers.
fn sdxl_with_words() -> magictailor::model::loader::StableDiffusion {
    let mut sd =
        magictailor::model::loader::StableDiffusion::load(&tiny_sdxl(), &Device::Cpu, DType::F32)
            .unwrap();
    let words = ["<v0>".to_string(), "<v1>".to_string()];
    sd.tokenizer.add_pseudo_words(&words).unwrap();
    (sd.text_encoder_2.as_mut().unwrap().1)
        .add_pseudo_words(&words)
        .unwrap();
    sd
}

/// The tensors of `tests/fixtures/sdxl/{file}`; with `prefix`, those under `{prefix}.`,
/// named without it.
fn step_fixture(file: &str, prefix: Option<&str>) -> Tensors {
    let all = candle_core::safetensors::load(fixtures().join("sdxl").join(file), &Device::Cpu);
    let pre = prefix.map(|p| format!("{p}.")).unwrap_or_default();
    (all.unwrap().into_iter())
        .filter_map(|(k, v)| Some((k.strip_prefix(&pre)?.to_string(), v)))
        .collect()
}

/// Rank-4, alpha-4 adapters on `targets` at the fixture's `{prefix}{path}.A` and `.B`.
fn fixture_lora(
    f: &Tensors,
    targets: &[magictailor::model::lora::LoraTarget],
    prefix: &str,
) -> magictailor::model::lora::TrainableLora {
    use magictailor::model::lora::{LoraModule, TrainableLora};
    let lora = TrainableLora::new(targets, 4, 4.0, 0, &Device::Cpu, DType::F32).unwrap();
    for LoraModule { path, a, b } in &lora.modules {
        a.set(&f[&format!("{prefix}{path}.A")]).unwrap();
        b.set(&f[&format!("{prefix}{path}.B")]).unwrap();
    }
    lora
}

/// The fixture's rows in each encoder (`rows_1`, `rows_2`), trainable.
fn fixture_rows(f: &Tensors) -> [candle_core::Var; 2] {
    [&f["rows_1"], &f["rows_2"]].map(|t| candle_core::Var::from_tensor(t).unwrap())
}

/// Each adapter matrix with its gradient's fixture key.
fn adapter_grads(
    lora: &magictailor::model::lora::TrainableLora,
) -> Vec<(candle_core::Var, String)> {
    (lora.modules.iter())
        .flat_map(|m| {
            [
                (m.a.clone(), format!("grad.{}.A", m.path)),
                (m.b.clone(), format!("grad.{}.B", m.path)),
            ]
        })
        .collect()
}

/// Both encoders' rows with their gradients' fixture keys.
fn row_grads(rows: &[candle_core::Var; 2]) -> [(candle_core::Var, String); 2] {
    [
        (rows[0].clone(), "grad_1".into()),
        (rows[1].clone(), "grad_2".into()),
    ]
}

/// The worst gradient error over `vars` (each against `f[key]`, relative to that
/// reference's largest entry), with its key.
fn worst_gradient(
    grads: &candle_core::backprop::GradStore,
    f: &Tensors,
    vars: impl IntoIterator<Item = (candle_core::Var, String)>,
) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for (var, key) in vars {
        let (got, want) = (grads.get(var.as_tensor()).unwrap(), &f[&key]);
        let rel =
            max_abs_diff(got, want) / magictailor::testkit::tolerance::max_abs(want).max(1e-8);
        // A NaN is the worst.
        if rel.is_nan() || rel > worst.0 {
            worst = (rel, key);
        }
    }
    worst
}

/// MagicTailor's SDXL steps (scripts/make_sdxl_magictailor_fixture.py): three images of
/// two samples, a row per word in each encoder, adapters on every layer MagicTailor
/// adapts, and L_attn on the latent/4 level's maps (down_blocks.2 and up_blocks.0, every
/// transformer layer). The warm-up step's loss terms and gradients, then the DS-Bal
/// step's per-sample losses, chosen sample, L_diff-max and L_pres, against torch's.
#[test]
fn an_sdxl_magictailor_step_matches_torch() {
    use magictailor::train::method::LossWeights;
    use magictailor::train::objective::{step_losses, Online, TextParams};
    use magictailor::train::setup::lora_targets;
    let (f, sd) = (
        step_fixture("magictailor_step.safetensors", None),
        sdxl_with_words(),
    );
    let prompts = ["a photo of <v0>", "a photo of <v0>", "a photo of <v1>"];
    let (batch, noised) = step_inputs(&f, &sd, &prompts, &[0, 0, 1]);
    let targets = lora_targets(&sd, None);
    let lora = fixture_lora(&f, &targets, "");
    let momentum = fixture_lora(&f, &targets, "mom.").detached();
    assert_eq!(lora.modules.len(), 220, "the same adapted layers");
    let rows = fixture_rows(&f);
    let text = TextParams {
        rows: rows[0].as_tensor(),
        table: None,
        rows_2: Some(rows[1].as_tensor()),
        table_2: None,
    };
    let w = LossWeights {
        lambda_attn: 0.01,
        lambda_pres: 0.2,
        ..LossWeights::default()
    };
    let set = lora.as_set();
    let losses = |m| step_losses(&sd, &batch, &noised, Online::lora(&set), text, m, w).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();

    let warm = losses(None);
    let d_img = max_abs_diff(&warm.per_image, &f["per_image"]);
    let d_attn = (scalar(&warm.l_attn) - scalar(&f["l_attn"])).abs();
    let d_loss = (scalar(&warm.loss) - scalar(&f["loss"])).abs();
    assert!(
        d_img < 1e-6 && d_attn < 1e-5 && d_loss < 1e-6,
        "per-image {d_img}, L_attn {d_attn}, loss {d_loss}"
    );
    let grads = warm.loss.backward().unwrap();
    let worst = worst_gradient(
        &grads,
        &f,
        adapter_grads(&lora).into_iter().chain(row_grads(&rows)),
    );
    assert!(worst.0 < 1e-4, "worst gradient error, relative: {worst:?}");

    let ds = losses(Some(&momentum));
    assert!(max_abs_diff(&ds.per_sample, &f["per_sample"]) < 1e-6);
    let chosen: i64 = f["chosen"].to_scalar().unwrap();
    assert_eq!(ds.chosen, Some(chosen as usize));
    let d_max = (scalar(&ds.l_diff) - scalar(&f["l_diff_max"])).abs();
    let d_pres = (scalar(&ds.l_pres) - scalar(&f["l_pres"])).abs() / scalar(&f["l_pres"]);
    assert!(
        d_max < 1e-6 && d_pres < 2e-5,
        "L_diff-max {d_max}, L_pres relative {d_pres}"
    );
    eprintln!(
        "SDXL MagicTailor: per-image {d_img:e}, L_attn {d_attn:e}, loss {d_loss:e}; worst \
         gradient {worst:?}; DS-Bal: L_max {d_max:e}, L_pres rel {d_pres:e}"
    );
}

/// Custom Diffusion's SDXL step (scripts/make_sdxl_tuned_fixture.py): every
/// cross-attention's key and value matrices tuned, a row per word in each encoder; the
/// loss and every gradient against torch's.
#[test]
fn an_sdxl_custom_diffusion_step_matches_torch() {
    use magictailor::train::method::CROSS_ATTENTION_KV;
    let s = TunedSdxlStep::load("cd", &CROSS_ATTENTION_KV);
    let prompts = ["photo of a <v0>", "close up photo of a <v1>"];
    let (batch, noised) = step_inputs(&s.f, &s.sd, &prompts, &[0, 1]);
    s.check(&batch, &noised, None, &["loss"]);
}

/// CLiC's SDXL step (scripts/make_sdxl_tuned_fixture.py): q/k/v/out of every
/// cross-attention tuned, the image and its masked copy with their prompts by both
/// tokenizers, L_att on every up-block cross-attention layer; the three loss terms and
/// every gradient against torch's.
#[test]
fn an_sdxl_clic_step_matches_torch() {
    use magictailor::train::method::{ClicWeights, CROSS_ATTENTION_ALL};
    use magictailor::train::objective::RoiPrompts;
    let s = TunedSdxlStep::load("clic", &CROSS_ATTENTION_ALL);
    let prompts = ["a photo of <v0>", "<v0> on a blank background"];
    // Both prompts' ids and latents are the fixture's; the first is the image's.
    let (both, noised) = step_inputs(&s.f, &s.sd, &prompts, &[0, 0]);
    let first = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    let mut batch = both.clone();
    batch.ids = first(&both.ids, 0);
    batch.ids_2 = both.ids_2.as_ref().map(|t| first(t, 0));
    batch.token_pos = vec![4];
    batch.sample_of = vec![0];
    batch.n_samples = 1;
    batch.roi = Some(RoiPrompts {
        ids: first(&both.ids, 1),
        ids_2: both.ids_2.as_ref().map(|t| first(t, 1)),
        token_pos: vec![1],
    });
    let terms = ["loss", "l_att", "l_ctx", "l_roi"];
    s.check(&batch, &noised, Some(ClicWeights::PAPER), &terms);
}

/// A tuned method's SDXL reference step: the tiny SDXL with `<v0>`, `<v1>` in both
/// tokenizers, the fixture's rows, and the layers `only` names tuned at the fixture's values.
struct TunedSdxlStep {
    f: std::collections::HashMap<String, Tensor>,
    sd: magictailor::model::loader::StableDiffusion,
    rows: [candle_core::Var; 2],
    tuned: magictailor::model::tuned::TrainableTuned,
}

impl TunedSdxlStep {
    fn load(prefix: &str, only: &[&str]) -> Self {
        use magictailor::model::tuned::TrainableTuned;
        let (f, sd) = (
            step_fixture("tuned_steps.safetensors", Some(prefix)),
            sdxl_with_words(),
        );
        let paths: Vec<String> = (magictailor::train::setup::lora_targets(&sd, Some(only)))
            .into_iter()
            .map(|t| t.path)
            .collect();
        let tuned = TrainableTuned::new(sd.unet.base_weights(&paths), true, DType::F32).unwrap();
        let n_grads = f.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(tuned.named().len(), n_grads, "the same tuned tensors");
        for (name, v) in tuned.named() {
            v.set(&f[name.strip_prefix("tuned.").unwrap()]).unwrap();
        }
        let rows = fixture_rows(&f);
        Self { f, sd, rows, tuned }
    }

    /// The step's `terms` (the loss, then CLiC's L_att, L_context, L_RoI) to 2e-6 of their
    /// size, and every gradient (the tuned tensors', both rows') to 1e-4 of its largest entry.
    fn check(
        &self,
        batch: &magictailor::train::objective::Batch,
        noised: &magictailor::train::objective::Noised,
        clic: Option<magictailor::train::method::ClicWeights>,
        terms: &[&str],
    ) {
        use magictailor::train::method::LossWeights;
        use magictailor::train::objective::{step_losses, Online, TextParams};
        let (none, set) = (
            magictailor::model::lora::LoraSet::default(),
            self.tuned.as_set(),
        );
        let online = Online {
            tuned: Some(&set),
            ..Online::lora(&none)
        };
        let text = TextParams {
            rows: self.rows[0].as_tensor(),
            table: None,
            rows_2: Some(self.rows[1].as_tensor()),
            table_2: None,
        };
        let w = LossWeights {
            lambda_attn: 0.0,
            clic,
            ..LossWeights::default()
        };
        let l = step_losses(&self.sd, batch, noised, online, text, None, w).unwrap();
        let got = [
            Some(&l.loss),
            Some(&l.l_attn),
            Some(&l.l_diff),
            l.l_roi.as_ref(),
        ];
        for (key, got) in terms.iter().zip(got) {
            let got: f32 = got.unwrap().to_scalar().unwrap();
            let want: f32 = self.f[*key].to_scalar().unwrap();
            assert!(
                (got - want).abs() < 2e-6 * want.abs().max(1.0),
                "{key}: {got} vs {want}"
            );
        }
        let grads = l.loss.backward().unwrap();
        let tuned = (self.tuned.named().into_iter())
            .map(|(n, v)| (v, format!("grad.{}", n.strip_prefix("tuned.").unwrap())));
        let worst = worst_gradient(&grads, &self.f, tuned.chain(row_grads(&self.rows)));
        eprintln!("SDXL tuned step: worst gradient error {worst:?}");
        assert!(worst.0 < 1e-4, "worst gradient error, relative: {worst:?}");
    }
}

/// `train --method vico` on the tiny SDXL: a block at each of its three sites, each word's
/// rows in both encoders; `infer` on the folder (its blocks, its first images as the
/// references) draws what its last checkpoint draws.
#[test]
fn vico_trains_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let more = ["--method", "vico", "--steps", "3", "--lr", "5e-3"];
    ok(&run_bin(
        "train",
        &with_args(quiet_train_args(&pair, run_s, &model), &more),
    ));
    let blocks =
        candle_core::safetensors::load(run.join("vico_blocks.safetensors"), &Device::Cpu).unwrap();
    let sites: std::collections::BTreeSet<&str> = (blocks.keys())
        .map(|k| k.split(".image_cross_attention.").next().unwrap())
        .collect();
    let want = [
        "up_blocks.0.attentions.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.2",
    ];
    assert_eq!(sites.into_iter().collect::<Vec<_>>(), want);
    let e = candle_core::safetensors::load(run.join("learned_embeds_2.safetensors"), &Device::Cpu);
    assert_eq!(e.unwrap().len(), 2);
    draws_as_its_last_checkpoint(dir.path(), &run, 3, "<v0> with <v1>");
}

/// `train --method break-a-scene --phase2-lora 4` on the tiny SDXL, with prior
/// preservation's class images drawn by the SDXL base: the rows train in both encoders,
/// then the adapters join; the folder draws what its last checkpoint draws. Without
/// `--phase2-lora`, the full fine-tune is refused by name before anything is written.
#[test]
fn break_a_scene_trains_adapters_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let phases = [
        "--phase1-steps",
        "2",
        "--phase2-steps",
        "2",
        "--class-images",
        "2",
    ];
    let args = |extra: &[&'static str]| {
        let a = with_args(
            quiet_train_args(&pair, run_s, &model),
            &["--method", "break-a-scene"],
        );
        with_args(with_args(a, &phases), extra)
    };
    ok(&run_bin("train", &args(&["--phase2-lora", "4"])));
    let classes = std::fs::read_dir(run.join("class_images/a photo at the beach")).unwrap();
    let pngs = classes.filter(|e| {
        e.as_ref()
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "png")
    });
    assert_eq!(pngs.count(), 2);
    let c2 = candle_core::safetensors::load(
        run.join("checkpoints/step-000002.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let c4 = candle_core::safetensors::load(
        run.join("checkpoints/step-000004.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        max_abs_diff(&c2["rows_2"], &c4["rows_2"]) > 0.0,
        "the second encoder's rows train"
    );
    let kohya =
        candle_core::safetensors::load(run.join("lora_kohya.safetensors"), &Device::Cpu).unwrap();
    let up = (kohya.iter())
        .find(|(k, _)| k.ends_with("lora_up.weight"))
        .unwrap();
    assert!(
        up.0.starts_with("lora_unet_input_blocks_")
            || up.0.starts_with("lora_unet_output_blocks_")
            || up.0.starts_with("lora_unet_middle_block_"),
        "{}",
        up.0
    );
    assert!(
        magictailor::testkit::tolerance::max_abs(up.1) > 0.0,
        "the adapters train in phase 2"
    );
    draws_as_its_last_checkpoint(dir.path(), &run, 4, "<v0> with <v1>");
}

/// `train --method break-a-scene` on the tiny SDXL fine-tunes the U-Net and both text
/// encoders in phase 2: the delta holds all three (`text_encoder_2.*` too); the folder
/// (base + delta) draws what its last checkpoint (the whole weights) draws; `--export-full`
/// writes the three components, and the base with them in place draws the run's image; a
/// run killed in phase 2 resumes to the same delta, byte for byte.
#[test]
fn break_a_scene_fine_tunes_both_encoders_on_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_folder(dir.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap().to_string(), tiny_sdxl());
    let (run, export) = (dir.path().join("run"), dir.path().join("export"));
    let args = with_args(
        quiet_train_args(&pair, run.to_str().unwrap(), &model),
        &[
            "--method",
            "break-a-scene",
            "--phase1-steps",
            "2",
            "--phase2-steps",
            "2",
        ],
    );
    let args = with_args(
        args,
        &[
            // A rate that moves the tiny model's image in two steps.
            "--phase2-lr",
            "1e-3",
            "--checkpoint-every",
            "1",
            "--class-images",
            "2",
            "--export-full",
            export.to_str().unwrap(),
        ],
    );
    ok(&run_bin("train", &args));
    let delta =
        candle_core::safetensors::load(run.join("full_weights_delta.safetensors"), &Device::Cpu)
            .unwrap();
    for prefix in ["unet.", "text_encoder.", "text_encoder_2."] {
        let n = delta.keys().filter(|k| k.starts_with(prefix)).count();
        assert!(n > 10, "{n} tensors under {prefix}");
    }
    let prompt = "<v0> with <v1>";
    let drawn = draws_as_its_last_checkpoint(dir.path(), &run, 4, prompt);
    // The base with the exported components in place, and the run's words.
    let merged = dir.path().join("merged");
    copy_dir(Path::new(&model), &merged);
    for component in ["unet", "text_encoder", "text_encoder_2"] {
        std::fs::remove_dir_all(merged.join(component)).unwrap();
        copy_dir(&export.join(component), &merged.join(component));
    }
    let embeds = run.join("learned_embeds.safetensors");
    let image = dir.path().join("merged.png");
    let extra = [
        "--model",
        merged.to_str().unwrap(),
        "--embeds",
        embeds.to_str().unwrap(),
    ];
    ok(&infer_sdxl_run(&extra, prompt, &image));
    let d = png_max_diff(&read_png(&drawn), &read_png(&image));
    assert!(
        d <= 1,
        "the exported components draw the run's image within {d} levels"
    );
    // The fine-tune moved the image: the base with the same words draws another.
    let base = dir.path().join("base.png");
    let extra = [
        "--model",
        model.as_str(),
        "--embeds",
        embeds.to_str().unwrap(),
    ];
    ok(&infer_sdxl_run(&extra, prompt, &base));
    let moved = png_max_diff(&read_png(&drawn), &read_png(&base));
    assert!(
        moved > 2,
        "the fine-tuned weights changed the image by {moved} levels"
    );
    // For scripts/check_rust_exports.py: diffusers' SDXL pipeline draws it from the
    // exported components and the A1111 words.
    let check = leave_check(&run, "sdxl-break-a-scene", &[], &drawn, prompt);
    copy_dir(&export, &check.join("full"));
    // Killed after step 3 (in phase 2): the resumed run writes the same delta.
    let killed = dir.path().join("killed");
    let (killed_s, other) = (killed.to_str().unwrap(), dir.path().join("export-2"));
    let mut resumed = args.clone();
    set_arg(&mut resumed, "--out-dir", killed_s);
    set_arg(&mut resumed, "--export-full", other.to_str().unwrap());
    killed_after_step_resumes_alike(
        &run,
        &killed,
        3,
        &resumed,
        &["full_weights_delta.safetensors"],
    );
}

/// A run killed after its `step` (`killed` holds that checkpoint alone) and resumed with
/// `args` writes the same `files` as the whole run did in `run`.
fn killed_after_step_resumes_alike(
    run: &Path,
    killed: &Path,
    step: usize,
    args: &[&str],
    files: &[&str],
) {
    std::fs::create_dir_all(killed.join("checkpoints")).unwrap();
    let name = format!("checkpoints/step-{step:06}.safetensors");
    std::fs::copy(run.join(&name), killed.join(&name)).unwrap();
    ok(&run_bin("train", &with_args(args.to_vec(), &["--resume"])));
    for f in files {
        assert!(
            read_bytes(&killed.join(f)) == read_bytes(&run.join(f)),
            "{f}"
        );
    }
}

/// Break-A-Scene's phase-2 step with `--phase2-lora` on SDXL
/// (scripts/make_sdxl_bas_fixture.py): two instance images with their words and a beach
/// class image learned whole; the masked loss, the prior loss, L_attn summed over the
/// words on the latent/4 maps; every adapter's and both rows' gradients against torch's.
#[test]
fn an_sdxl_break_a_scene_lora_step_matches_torch() {
    use magictailor::train::objective::{Online, TextParams};
    use magictailor::train::setup::lora_targets;
    let (f, sd) = (
        step_fixture("bas_lora_step.safetensors", None),
        sdxl_with_words(),
    );
    let lora = fixture_lora(&f, &lora_targets(&sd, None), "");
    let rows = fixture_rows(&f);
    let text = TextParams {
        rows: rows[0].as_tensor(),
        table: None,
        rows_2: Some(rows[1].as_tensor()),
        table_2: None,
    };
    let set = lora.as_set();
    let loss = bas_step_terms(&f, &sd, Online::lora(&set), text);
    let grads = loss.backward().unwrap();
    let worst = worst_gradient(
        &grads,
        &f,
        adapter_grads(&lora).into_iter().chain(row_grads(&rows)),
    );
    eprintln!("SDXL Break-A-Scene LoRA step: worst gradient error {worst:?}");
    assert!(worst.0 < 1e-4, "worst gradient error, relative: {worst:?}");
}

/// Break-A-Scene's phase-2 step on SDXL as its full fine-tune
/// (scripts/make_sdxl_bas_fixture.py): the same step with every weight of the U-Net and
/// both text encoders trainable; the loss terms, and the gradient of every weight (each
/// token table's base rows included) and of both words' rows against torch's.
#[test]
fn an_sdxl_break_a_scene_full_step_matches_torch() {
    use magictailor::model::full::FullWeights;
    use magictailor::train::objective::{Finetuned, Online, TextParams};
    let (f, sd) = (
        step_fixture("bas_full_step.safetensors", None),
        sdxl_with_words(),
    );
    let full = FullWeights::of(&sd).unwrap();
    let model = Finetuned::over(&full, DType::F32).unwrap();
    let rows = fixture_rows(&f);
    let text = TextParams {
        rows: rows[0].as_tensor(),
        table: Some(full.token_table().as_tensor()),
        rows_2: Some(rows[1].as_tensor()),
        table_2: Some(full.token_table_2().unwrap().as_tensor()),
    };
    let none = magictailor::model::lora::LoraSet::default();
    let online = Online {
        full: Some(&model),
        ..Online::lora(&none)
    };
    let loss = bas_step_terms(&f, &sd, online, text);
    let grads = loss.backward().unwrap();
    let vars = (full.named().into_iter())
        .map(|(name, var)| (var, format!("grad.{name}")))
        .chain(row_grads(&rows));
    let (mut worst, mut checked) = ((0f32, String::new()), 0);
    for (var, key) in vars {
        let want = &f[&key];
        // The first encoder's last layer reads into no loss (SDXL takes its penultimate
        // states): no gradient on either side.
        let got = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => want.zeros_like().unwrap(),
        };
        // Gradients that are zero in exact arithmetic are 1e-10 noise on both sides.
        let rel =
            max_abs_diff(&got, want) / magictailor::testkit::tolerance::max_abs(want).max(1e-5);
        if rel.is_nan() || rel > worst.0 {
            worst = (rel, key);
        }
        checked += 1;
    }
    eprintln!("SDXL Break-A-Scene full step: {checked} gradients, worst error {worst:?}");
    assert!(checked > 300, "{checked} tensors checked");
    assert!(worst.0 < 1e-4, "worst gradient error, relative: {worst:?}");
}

/// Break-A-Scene's phase-2 step of `f` (two images with their words, a beach class image
/// learned whole) through `online` and `text`: its loss terms checked against torch's;
/// the loss.
fn bas_step_terms(
    f: &Tensors,
    sd: &magictailor::model::loader::StableDiffusion,
    online: magictailor::train::objective::Online,
    text: magictailor::train::objective::TextParams,
) -> Tensor {
    use magictailor::train::method::LossWeights;
    let prompts = ["a photo of <v0>", "a photo of <v1>", "a photo at the beach"];
    let (mut batch, noised) = step_inputs(f, sd, &prompts, &[0, 1, 0]);
    (batch.prior, batch.n_samples) = (1, 2);
    let w = LossWeights {
        lambda_attn: 0.01,
        attn_summed: true,
        prior: 1.0,
        ..LossWeights::default()
    };
    let l = magictailor::train::objective::step_losses(sd, &batch, &noised, online, text, None, w)
        .unwrap();
    let l_prior = l.l_prior.clone().unwrap();
    for (key, got) in [
        ("loss", &l.loss),
        ("l_diff", &l.l_diff),
        ("l_prior", &l_prior),
    ] {
        let (got, want): (f32, f32) = (got.to_scalar().unwrap(), f[key].to_scalar().unwrap());
        assert!(
            (got - want).abs() < 2e-6 * want.abs().max(1.0),
            "{key}: {got} vs {want}"
        );
    }
    // Ours is the mean over the words times their count: the source's sum.
    let (attn, want): (f32, f32) = (
        l.l_attn.to_scalar().unwrap(),
        f["l_attn"].to_scalar().unwrap(),
    );
    assert!((attn - want).abs() < 1e-5, "L_attn {attn} vs {want}");
    l.loss
}
