//! Layout-and-Retouch's retouch stage (`infer --retouch`): the attention swap and blend
//! inside the U-Net (through their record of each changed layer), the whole stage with
//! swap and blend off against the target path drawn alone, and the command end to end.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::infer::retouch::{self, Retouch};
use magictailor::infer::{
    decode, denoise, invert, to_images, Personalized, Prompted, Sampling, Sources,
};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::nn::Ctx;
use magictailor::model::swap::{swap_layers, Source, Swap};
use magictailor::rng::seeded_normal;
use magictailor::testkit::tolerance::max_abs_diff;

#[test]
fn swap_layers_are_masactrls_decoder_layers() {
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let mut layers: Vec<String> = swap_layers(&sd.unet).into_iter().collect();
    layers.sort();
    // Running ids 10 to 15 of SD's 16 transformers: the decoder's two finest levels.
    let want: Vec<String> = (2..4)
        .flat_map(|b| (0..3).map(move |a| format!("up_blocks.{b}.attentions.{a}")))
        .collect();
    assert_eq!(layers, want);
}

/// On SDXL the decoder's coarsest level with attention is `up_blocks.0` (latent/4), so
/// the swap reads `up_blocks.1`'s transformers (latent/2), every layer of each.
#[test]
fn swap_layers_on_sdxl_are_the_decoders_finer_level() {
    let sd = StableDiffusion::load(&tiny_sdxl(), &Device::Cpu, DType::F32).unwrap();
    let mut layers: Vec<String> = swap_layers(&sd.unet).into_iter().collect();
    layers.sort();
    let want: Vec<String> = (0..3)
        .map(|a| format!("up_blocks.1.attentions.{a}"))
        .collect();
    assert_eq!(layers, want);
}

/// The tiny model in f64 and a batch of `rows` latents (by seed) on one prompt.
struct Batch {
    sd: StableDiffusion,
    x: Tensor,
    t: Tensor,
    text: Tensor,
}

fn batch(seeds: &[u64]) -> Batch {
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F64).unwrap();
    let rows: Vec<Tensor> = (seeds.iter())
        .map(|&s| seeded_normal(s, (1, 4, 8, 8), &dev).unwrap())
        .collect();
    let x = Tensor::cat(&rows, 0).unwrap().to_dtype(DType::F64).unwrap();
    let n = seeds.len();
    let ids = sd.tokenizer.encode("a photo of a dog").unwrap();
    let ids = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let text = sd
        .text_encoder
        .forward(&ids, None)
        .unwrap()
        .repeat((n, 1, 1))
        .unwrap();
    Batch {
        t: Tensor::new(vec![501f64; n], &dev).unwrap(),
        sd,
        x,
        text,
    }
}

impl Batch {
    fn forward(&self, swap: Option<&Swap>) -> Tensor {
        let ctx = Ctx {
            swap,
            ..Ctx::default()
        };
        self.sd
            .unet
            .forward(&self.x, &self.t, &self.text, ctx)
            .unwrap()
    }
    fn row(out: &Tensor, i: usize) -> Tensor {
        out.narrow(0, i, 1).unwrap()
    }
}

/// A target whose latent is its layout's reads the layout's keys and values, which are
/// its own: every swapped layer's output is the layout's, and so is the prediction.
#[test]
fn a_target_on_its_layouts_latent_gives_the_layouts_outputs() {
    let b = batch(&[1, 2, 1]); // layout, a reference, the target
    let swap = Swap::new(2, vec![0], vec![1])
        .swapping(Some(Source::Layout), swap_layers(&b.sd.unet))
        .recording();
    let out = b.forward(Some(&swap));
    let recorded = swap.take_recorded();
    assert_eq!(recorded.len(), 6, "one record per swapped layer");
    for (path, target, layout) in &recorded {
        let d = max_abs_diff(target, layout);
        assert!(d < 1e-12, "{path}: target and layout outputs differ by {d}");
    }
    let d = max_abs_diff(&Batch::row(&out, 2), &Batch::row(&out, 0));
    assert!(d < 1e-12, "prediction differs from the layout's by {d}");
}

/// Two references that are the target's own latent: attending to their keys side by side
/// is attending to its own (each key twice), so nothing changes.
#[test]
fn references_side_by_side_are_read_together() {
    let b = batch(&[3, 4, 4, 4]); // layout, two references, the target
    let swap = Swap::new(3, vec![0], vec![1, 2])
        .swapping(Some(Source::References), swap_layers(&b.sd.unet));
    let swapped = Batch::row(&b.forward(Some(&swap)), 3);
    let alone = Batch::row(&b.forward(None), 3);
    let d = max_abs_diff(&swapped, &alone);
    assert!(d < 1e-12, "{d}");
    // Another reference changes it.
    let b = batch(&[3, 4, 5, 4]);
    let swap = Swap::new(3, vec![0], vec![1, 2])
        .swapping(Some(Source::References), swap_layers(&b.sd.unet));
    let swapped = Batch::row(&b.forward(Some(&swap)), 3);
    assert!(max_abs_diff(&swapped, &Batch::row(&b.forward(None), 3)) > 1e-6);
}

/// Blend masks of 0 everywhere: every self-attention output of the target (whatever it
/// reads) is its layout's; masks of 1 with no swap leave the target as it is alone.
#[test]
fn blend_masks_of_zero_give_the_layouts_outputs_in_every_layer() {
    let b = batch(&[6, 7, 8]); // layout, a reference, the target (its own latent)
    let grids = [64usize, 16, 4, 1]; // 8x8 latents: 8x8, 4x4, 2x2, 1x1 queries
    let masks = |v: f64| -> HashMap<usize, Tensor> {
        (grids.iter())
            .map(|&q| (q, Tensor::full(v, (1, q, 1), &Device::Cpu).unwrap()))
            .collect()
    };
    for source in [None, Some(Source::Layout), Some(Source::References)] {
        let swap = Swap::new(2, vec![0], vec![1])
            .swapping(source, swap_layers(&b.sd.unet))
            .blending(masks(0.0))
            .recording();
        b.forward(Some(&swap));
        let recorded = swap.take_recorded();
        assert_eq!(recorded.len(), 16, "every self-attention layer blends");
        for (path, target, layout) in &recorded {
            assert_eq!(max_abs_diff(target, layout), 0.0, "{path} ({source:?})");
        }
    }
    let swap = Swap::new(2, vec![0], vec![1]).blending(masks(1.0));
    let blended = Batch::row(&b.forward(Some(&swap)), 2);
    let d = max_abs_diff(&blended, &Batch::row(&b.forward(None), 2));
    assert!(d < 1e-12, "{d}");
}

/// The fixture personalization (LoRA and two pseudo-words) on the tiny model, with the
/// two eval images as references.
fn sd_sources() -> Sources {
    Sources {
        model: tiny_sd(),
        lora: Some(fixtures().join("lora_peft.safetensors")),
        embeds: Some(fixtures().join("learned_embeds.safetensors")),
        references: vec![
            fixtures().join("eval_images/a.png"),
            fixtures().join("eval_images/b.png"),
        ],
        retouch: true,
        ..Default::default()
    }
}

fn tiny_sdxl() -> String {
    fixtures()
        .join("sdxl/tiny-sdxl")
        .to_string_lossy()
        .into_owned()
}

/// Diffusers' SDXL pair of word files in `dir` (`learned_embeds.safetensors` and its
/// `_2`): `<v0>` and `<v1>` with seeded rows in both of the tiny SDXL's encoders.
fn sdxl_words(dir: &Path) -> std::path::PathBuf {
    for (i, file) in ["learned_embeds", "learned_embeds_2"].iter().enumerate() {
        let words: HashMap<String, Tensor> = (0..2)
            .map(|w| {
                let row = seeded_normal(10 * i as u64 + w, 32, &Device::Cpu).unwrap();
                (format!("<v{w}>"), (row * 0.1).unwrap())
            })
            .collect();
        candle_core::safetensors::save(&words, dir.join(format!("{file}.safetensors"))).unwrap();
    }
    dir.join("learned_embeds.safetensors")
}

/// [`sd_sources`] on the tiny SDXL: its kohya fixture LoRA and [`sdxl_words`].
fn sdxl_sources(dir: &Path) -> Sources {
    Sources {
        model: tiny_sdxl(),
        lora: Some(fixtures().join("sdxl/lora_kohya_sdxl.safetensors")),
        embeds: Some(sdxl_words(dir)),
        ..sd_sources()
    }
}

fn personalized(src: &Sources, retouch: &Retouch, steps: usize) -> Personalized {
    let mut p = Personalized::load(src, &Device::Cpu, DType::F32).unwrap();
    p.retouch = Some(retouch::stage(&p, src, retouch, steps, &Device::Cpu).unwrap());
    p
}

/// With the swap and the blend off, the retouched image is the target path alone, byte
/// for byte: the personalized model with guidance from the layout's inverted noise (no
/// source rows ride along when nothing reads them); on SD 2.x and on SDXL (its added
/// conditioning).
#[test]
fn without_swap_and_blend_the_retouch_is_the_target_path_alone() {
    let tmp = tempfile::tempdir().unwrap();
    for src in [sd_sources(), sdxl_sources(tmp.path())] {
        target_path_alone(&src);
    }
}

fn target_path_alone(src: &Sources) {
    let steps = 6;
    let off = Retouch {
        swap: false,
        layout_swap_steps: 0,
        blend_from: steps,
        sam_model: None,
        kv_cache_mb: 0,
    };
    let p = personalized(src, &off, steps);
    let prompt = "<v0> with <v1>";
    let sampling = Sampling {
        steps,
        width: 64,
        height: 64,
        retouch: Some(off),
        ..Sampling::default()
    };
    let noise = magictailor::infer::seeded_latents(&[0, 1], (4, 8, 8), &Device::Cpu).unwrap();
    let drawn = Prompted::new(&p, prompt, &sampling)
        .unwrap()
        .draw(noise.clone(), || {})
        .unwrap();
    let w = p.weights();
    let main = w.condition(prompt, "", sampling.guidance).unwrap();
    let layout = denoise(&main, None, noise, steps, || {}).unwrap();
    let inverted = invert(
        &w.condition(prompt, "", 1.0).unwrap(),
        layout.clone(),
        steps,
    )
    .unwrap();
    let alone = denoise(&main, None, inverted, steps, || {}).unwrap();
    let layouts = to_images(&decode(w, &layout).unwrap()).unwrap();
    let images = to_images(&decode(w, &alone).unwrap()).unwrap();
    assert_eq!(drawn.layouts.as_ref().unwrap(), &layouts);
    for (got, want) in drawn.images.iter().zip(&images) {
        assert_eq!(got, want, "the target path alone on {}", src.model);
    }
    assert!(drawn.masks.is_none(), "nothing blended");
}

fn infer(args: &[&str]) -> std::process::Output {
    let size = ["--steps", "6", "--width", "64", "--height", "64"];
    run_bin("infer", &[args, &size].concat())
}

fn refs() -> [String; 4] {
    let f = |n: &str| fixtures().join("eval_images").join(n).display().to_string();
    [
        "--reference".into(),
        f("a.png"),
        "--reference".into(),
        f("b.png"),
    ]
}

/// `infer --retouch` on a trained folder writes the layout image (the plain step-blended
/// image), the retouched image and its mask, names them in its JSON and records the
/// settings; it draws the same bytes again.
#[test]
fn infer_retouch_writes_both_images_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_run(tmp.path(), serde_json::json!({}));
    let d = dir.to_str().unwrap();
    let draw = |out: &Path, extra: &[&str]| {
        let base = [
            "--model-dir",
            d,
            "--prompt",
            "<v0> with <v1>",
            "--layout-steps",
            "2",
        ];
        let o = infer(&[&base[..], &["--out", out.to_str().unwrap()], extra].concat());
        ok(&o);
        String::from_utf8(o.stdout).unwrap()
    };
    let out = tmp.path().join("r.png");
    let r = refs();
    let retouch: Vec<&str> = ["--retouch", "--save-masks", "--json"]
        .into_iter()
        .chain(r.iter().map(String::as_str))
        .collect();
    let line: serde_json::Value = serde_json::from_str(draw(&out, &retouch).trim()).unwrap();
    let layout = tmp.path().join("r-layout.png");
    let mask = tmp.path().join("r-mask.png");
    assert_eq!(line["image"], out.display().to_string());
    assert_eq!(line["layout"], layout.display().to_string());
    assert_eq!(line["mask"], mask.display().to_string());
    let plain = tmp.path().join("plain.png");
    draw(&plain, &["--quiet"]);
    assert!(
        read_png(&layout) == read_png(&plain),
        "the layout is stage 1's image"
    );
    assert!(
        read_png(&out) != read_png(&layout),
        "the retouch changes it"
    );
    let m = image::open(&mask).unwrap().to_luma8();
    assert_eq!(m.dimensions(), (64, 64));
    assert!(m.pixels().any(|p| p.0[0] == 255) && m.pixels().any(|p| p.0[0] == 0));
    let made: serde_json::Value = serde_json::from_str(&png_text(&out)["magictailor"]).unwrap();
    assert_eq!(made["retouch"]["layout_swap_steps"], 1);
    assert_eq!(made["retouch"]["blend_from"], 1);
    assert_eq!(made["references"].as_array().unwrap().len(), 2);
    let layout_made: serde_json::Value =
        serde_json::from_str(&png_text(&layout)["magictailor"]).unwrap();
    assert_eq!(layout_made["image"], "layout: stage 1, before the retouch");
    let bytes = [read_bytes(&out), read_bytes(&layout), read_bytes(&mask)];
    draw(&out, &retouch);
    assert!(bytes == [read_bytes(&out), read_bytes(&layout), read_bytes(&mask)]);
}

/// A prompts file: each image's layout beside it, named in the manifest; a batched image
/// is the one drawn alone.
#[test]
fn a_retouched_prompts_file_names_the_layouts_in_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_run(tmp.path(), serde_json::json!({}));
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "<v0> with <v1>\n<v1>, in the snow\n").unwrap();
    let out = tmp.path().join("many");
    let r = refs();
    let mut args = vec![
        "--model-dir",
        dir.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--seeds",
        "0..1",
        "--batch-size",
        "2",
        "--out-dir",
        out.to_str().unwrap(),
        "--retouch",
        "--quiet",
    ];
    args.extend(r.iter().map(String::as_str));
    ok(&infer(&args));
    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 4);
    for e in &entries {
        assert!(out.join(e["layout"].as_str().unwrap()).is_file(), "{e}");
        assert_eq!(e["retouch"]["swap"], true);
    }
    let alone = tmp.path().join("alone.png");
    let mut one = vec![
        "--model-dir",
        dir.to_str().unwrap(),
        "--prompt",
        "<v1>, in the snow",
        "--seed",
        "1",
        "--retouch",
        "--quiet",
        "--out",
        alone.to_str().unwrap(),
    ];
    one.extend(r.iter().map(String::as_str));
    ok(&infer(&one));
    let batched = read_png(&out.join("prompt01/seed01.png"));
    assert!(png_max_diff(&batched, &read_png(&alone)) <= 1);
}

fn refused(args: &[&str], needle: &str) {
    let o = infer(args);
    assert!(!o.status.success(), "{args:?} was accepted");
    let err = stderr(&o);
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn retouch_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_run(tmp.path(), serde_json::json!({}));
    let out = tmp.path().join("x.png");
    let r = refs();
    let with = |prompt: &str, extra: &[&str]| -> Vec<String> {
        let base = [
            "--model-dir",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--out",
        ];
        let base = base
            .iter()
            .map(|a| a.to_string())
            .chain([out.display().to_string()]);
        base.chain(extra.iter().map(|a| a.to_string())).collect()
    };
    let refused = |args: Vec<String>, needle: &str| {
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    let (r0, r1) = (r[1].as_str(), r[3].as_str());
    let one = ["--retouch", "--reference", r0];
    let two = ["--retouch", "--reference", r0, "--reference", r1];
    // Flags of the stage without it.
    refused(with("<v0>", &["--save-masks"]), "--retouch");
    refused(with("<v0>", &["--blend-from", "2"]), "--retouch");
    // No reference images (the fixture run records no pair folder).
    refused(with("<v0>", &["--retouch"]), "reference image");
    // A prompt without pseudo-words; a word without a reference; a typo.
    refused(with("a dog", &one), "names none");
    refused(with("<v1>", &one), "1 reference image(s)");
    refused(with("<dog>", &one), "not a pseudo-word");
    let more = |extra: &[&'static str]| -> Vec<&str> {
        two.iter().copied().chain(extra.iter().copied()).collect()
    };
    refused(
        with("<v0>", &more(&["--blend-from", "9"])),
        "--blend-from 9 is more than --steps 6",
    );
    refused(
        with("<v0>", &more(&["--blend-from", "0"])),
        "step 1 at the earliest",
    );
    refused(
        with("<v0>", &more(&["--no-blend", "--save-masks"])),
        "--no-blend",
    );
    refused(
        with("<v0>", &more(&["--no-swap", "--reference-cache-mb", "9"])),
        "--no-swap",
    );
    // What applies only to a blend, or only to the references' part, where there is none.
    refused(
        with("<v0>", &more(&["--blend-from", "6", "--save-masks"])),
        "nothing is blended",
    );
    let sam = ["--blend-from", "6", "--refine", "sam"];
    refused(with("<v0>", &more(&sam)), "nothing is blended");
    let all_layout = ["--swap-layout-steps", "6", "--reference-cache-mb", "9"];
    refused(
        with("<v0>", &more(&all_layout)),
        "read only after --swap-layout-steps",
    );
    assert!(!out.exists(), "nothing written");
}

/// `--refine sam`: SAM segments the layout image (a random tiny SAM here), the record
/// names it, and no warning says the masks are attention alone; a non-square size is
/// refused before anything loads.
#[test]
fn refine_sam_segments_the_layout_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_run(tmp.path(), serde_json::json!({}));
    let sam = tmp.path().join("sam.safetensors");
    magictailor::testkit::models::write_sam(&sam, 3).unwrap();
    let out = tmp.path().join("s.png");
    let r = refs();
    let mut args = vec![
        "--model-dir",
        dir.to_str().unwrap(),
        "--prompt",
        "<v0> with <v1>",
        "--retouch",
        "--refine",
        "sam",
        "--sam-model",
        sam.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(r.iter().map(String::as_str));
    let o = infer(&args);
    ok(&o);
    assert!(!stderr(&o).contains("attention alone"), "{}", stderr(&o));
    let made: serde_json::Value = serde_json::from_str(&png_text(&out)["magictailor"]).unwrap();
    assert_eq!(made["retouch"]["sam_model"], sam.display().to_string());
    let o = run_bin("infer", &[&args[..], &["--width", "128"]].concat());
    assert!(
        stderr(&o).contains("--refine sam segments square images"),
        "{}",
        stderr(&o)
    );
}

/// Every method's trained folder retouches (ViCo's is refused by name), each with its
/// pair folder's first image per sample as the references: DreamBooth's identifiers
/// ("sks person") are masked by their tokens like a pseudo-word's row.
#[test]
fn every_methods_run_retouches_with_its_pairs_first_images() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, model) = (pair.to_str().unwrap(), tiny_sd());
    for method in [
        "magictailor",
        "ti",
        "dreambooth",
        "custom-diffusion",
        "clic",
        "vico",
    ] {
        let out = tmp.path().join(method);
        let steps: &[&str] = match method {
            "magictailor" => &["--warmup-steps", "1", "--dsbal-steps", "1"],
            _ => &["--method", method, "--steps", "1"],
        };
        ok(&run_bin(
            "train",
            &with_args(quiet_train_args(pair, out.to_str().unwrap(), &model), steps),
        ));
        let image = out.join("r.png");
        let args = [
            "--model-dir",
            out.to_str().unwrap(),
            "--prompt",
            "<v0> with <v1>",
            "--retouch",
            "--layout-steps",
            "1",
            "--quiet",
            "--out",
            image.to_str().unwrap(),
        ];
        let o = infer(&args);
        if method == "vico" {
            assert!(stderr(&o).contains("--retouch on ViCo"), "{}", stderr(&o));
            continue;
        }
        ok(&o);
        assert!(out.join("r-layout.png").is_file(), "{method}");
        let made: serde_json::Value =
            serde_json::from_str(&png_text(&image)["magictailor"]).unwrap();
        assert_eq!(made["references"].as_array().unwrap().len(), 2, "{method}");
    }
}

/// An alias's positions are those of the text it stands for (DreamBooth's identifiers).
#[test]
fn an_alias_is_found_by_its_texts_tokens() {
    let mut sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let text = "sks tall dark person";
    let spelled = sd.tokenizer.word_positions("a photo of", text).unwrap();
    let raw = sd.tokenizer.word_positions("a photo of", "<v0>").unwrap();
    assert_ne!(raw, spelled, "the test needs a text of another length");
    let alias = [("<v0>".to_string(), text.to_string())];
    sd.tokenizer.add_aliases(&alias).unwrap();
    let aliased = sd.tokenizer.word_positions("a photo of", "<v0>").unwrap();
    assert!(spelled.is_some());
    assert_eq!(aliased, spelled);
}

/// The references' kept keys and values (computed once, one reference at a time) give the
/// image the references riding in every batch give, up to the GEMMs' rounding of another
/// batch size (README, *What holds for reproducing an image*).
#[test]
fn kept_reference_keys_give_the_image_of_references_in_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_run(tmp.path(), serde_json::json!({}));
    let r = refs();
    let draw = |name: &str, cache: &str| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "--model-dir",
            dir.to_str().unwrap(),
            "--prompt",
            "<v0> with <v1>",
            "--retouch",
            "--reference-cache-mb",
            cache,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(r.iter().map(String::as_str));
        ok(&infer(&args));
        read_png(&out)
    };
    let (kept, rows) = (draw("kept.png", "2048"), draw("rows.png", "0"));
    let d = png_max_diff(&kept, &rows);
    eprintln!("kept keys vs references in the batch: max {d} level(s)");
    assert!(d <= 1, "{d}");
}

/// `infer --retouch` on SDXL (the tiny SDXL with a kohya LoRA and diffusers' pair of word
/// files): the layout image is stage 1's, the retouch changes it and is drawn again byte
/// for byte, and the references' kept keys give the image of references in the batch.
#[test]
fn infer_retouches_on_sdxl() {
    let tmp = tempfile::tempdir().unwrap();
    let embeds = sdxl_words(tmp.path());
    let (model, lora) = (
        tiny_sdxl(),
        fixtures().join("sdxl/lora_kohya_sdxl.safetensors"),
    );
    let r = refs();
    let draw = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "--model",
            model.as_str(),
            "--lora",
            lora.to_str().unwrap(),
            "--embeds",
            embeds.to_str().unwrap(),
            "--prompt",
            "<v0> with <v1>",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        ok(&infer(&args));
        out
    };
    let mut retouch: Vec<&str> = r.iter().map(String::as_str).collect();
    retouch.extend(["--retouch", "--save-masks"]);
    let kept = draw("kept.png", &retouch);
    let plain = draw("plain.png", &[]);
    let layout = tmp.path().join("kept-layout.png");
    assert!(
        read_png(&layout) == read_png(&plain),
        "the layout is stage 1's image"
    );
    assert!(
        read_png(&kept) != read_png(&layout),
        "the retouch changes it"
    );
    assert!(tmp.path().join("kept-mask.png").is_file());
    let made: serde_json::Value = serde_json::from_str(&png_text(&kept)["magictailor"]).unwrap();
    assert_eq!(made["retouch"]["swap"], true, "{made}");
    let bytes = read_bytes(&kept);
    draw("kept.png", &retouch);
    assert!(bytes == read_bytes(&kept), "drawn again byte for byte");
    retouch.extend(["--reference-cache-mb", "0"]);
    let rows = draw("rows.png", &retouch);
    let d = png_max_diff(&read_png(&kept), &read_png(&rows));
    eprintln!("SDXL kept keys vs references in the batch: max {d} level(s)");
    assert!(d <= 1, "{d}");
}
