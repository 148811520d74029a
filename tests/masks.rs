//! `magictailor masks`: attention masks on a tiny model built so that the class words'
//! cross-attention marks a known region, the folder it writes, SAM refinement plumbing
//! on a random-weight MobileSAM, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use magictailor::io::tensors;
use magictailor::masks::Binary;
use magictailor::model::loader::StableDiffusion;

const RES: &str = "64";

/// person_k+hair_c with `n` RedBlue pictures per sample (64x64, object = red left half).
fn redblue_pair(root: &Path, n: usize) -> PathBuf {
    let img = PairImage {
        size: (64, 64),
        format: Format::Png,
        picture: Picture::RedBlue,
    };
    let spec = PairSpec {
        samples: vec![("person_k", vec![img; n]), ("hair_c", vec![img; n])],
        masks: false,
        mask_size: None,
        other_masks: false,
    };
    pair_folder(root, &spec)
}

fn zeros_like(t: &Tensor) -> Vec<f32> {
    vec![0.0; t.elem_count()]
}

fn put(w: &mut HashMap<String, Tensor>, name: &str, values: Vec<f32>) {
    let shape = w[name].shape().clone();
    w.insert(
        name.to_string(),
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
    );
}

/// A `[out, in, k, k]` conv (or `[out, in]` linear) reading input channel `i` into output
/// channel `o` at the kernel's centre with weight `v`, everything else zero.
fn one_tap(w: &mut HashMap<String, Tensor>, name: &str, taps: &[(usize, usize, f32)]) {
    let dims = w[name].dims().to_vec();
    let mut v = zeros_like(&w[name]);
    let (ins, k) = (dims[1], dims.get(2).copied().unwrap_or(1));
    for &(o, i, x) in taps {
        v[((o * ins + i) * k + k / 2) * k + k / 2] = x;
    }
    put(w, name, v);
}

/// Rewrites the tiny U-Net so that latent channels, projected on `dir` (+ `bias`), reach
/// every transformer as the sign of channel 0, and every cross-attention's head 0 turns
/// that sign into attention to `person` (positive) or `hair` (negative). All residual
/// branches are zeroed, so the U-Net is the identity on channel 0 between layers.
fn engineer_unet(
    w: &mut HashMap<String, Tensor>,
    dir: [f32; 4],
    bias: f32,
    person: &[f32],
    hair: &[f32],
) {
    let names: Vec<String> = w.keys().cloned().collect();
    let gain = 4.0;
    let unit = |c: &[f32]| {
        let n = c.iter().map(|x| x * x).sum::<f32>().sqrt();
        c.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let (p, h) = (unit(person), unit(hair));
    for n in &names {
        let zero = n.contains(".conv2.")
            || n.contains("proj_out")
            || n.contains("attn1.to_out")
            || (n.ends_with(".bias")
                && (n.contains("conv_shortcut")
                    || n.contains("samplers")
                    || n.contains("proj_in")));
        if zero {
            let v = zeros_like(&w[n]);
            put(w, n, v);
        } else if n.contains("conv_shortcut.weight")
            || n.contains("samplers.0.conv.weight")
            || n.contains("proj_in.weight")
        {
            one_tap(w, n, &[(0, 0, 1.0)]);
        } else if n.contains("attentions")
            && (n.ends_with(".norm.weight") || n.ends_with("norm2.weight"))
        {
            let v = vec![1.0; w[n].elem_count()];
            put(w, n, v);
        } else if n.contains("attentions")
            && (n.ends_with(".norm.bias") || n.ends_with("norm2.bias"))
        {
            let v = zeros_like(&w[n]);
            put(w, n, v);
        } else if n.ends_with("attn2.to_q.weight") {
            one_tap(w, n, &[(0, 0, gain), (1, 0, -gain)]);
        } else if n.ends_with("attn2.to_k.weight") {
            let cols = w[n].dim(1).unwrap();
            let mut v = zeros_like(&w[n]);
            v[..cols].copy_from_slice(&p);
            v[cols..2 * cols].copy_from_slice(&h);
            put(w, n, v);
        }
    }
    let mut v = zeros_like(&w["conv_in.weight"]);
    for (c, d) in dir.iter().enumerate() {
        v[(c * 3 + 1) * 3 + 1] = *d; // output channel 0, input c, centre tap
    }
    put(w, "conv_in.weight", v);
    let mut b = zeros_like(&w["conv_in.bias"]);
    b[0] = bias;
    put(w, "conv_in.bias", b);
}

/// A tiny model whose class-word attention is high on the red half (person) and on the
/// blue half (hair) of a RedBlue picture: the masks must recover exactly those halves.
fn engineered_model(root: &Path, picture: &Path) -> PathBuf {
    let dir = root.join("engineered-sd");
    magictailor::model::tiny::write(&dir, 7).unwrap();
    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    let mut w = tensors::read(&vae, &Device::Cpu).unwrap();
    engineer_vae(&mut w, 50.0);
    tensors::write(&vae, &w, None).unwrap();
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    // The two latent levels of the red and the blue half.
    let px = magictailor::data::load_rgb(picture, 64, &Device::Cpu).unwrap();
    let z = (sd.vae.encode(&px.unsqueeze(0).unwrap()).unwrap().mean * sd.vae.config.scaling_factor)
        .unwrap()
        .i((0, 0))
        .unwrap();
    let (red, blue) = (
        z.i((0, 0)).unwrap().to_scalar::<f32>().unwrap(),
        z.i((7, 7)).unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!(
        (red - blue).abs() > 1.0,
        "the halves' latents differ: {red} vs {blue}"
    );
    let k = 8.0 / (red - blue); // the U-Net's channel 0 is +-4 on the two halves
    let proj = [k, 0.0, 0.0, 0.0];
    let mid = k * (red + blue) / 2.0;
    // The class words' text features, where the U-Net's keys read them.
    let prompt = "a photo of a person with hair";
    let ids = sd.tokenizer.encode(prompt).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ctx = sd.text_encoder.forward(&ids, None).unwrap().get(0).unwrap();
    let at = |before: &str, word: &str| {
        let pos = sd.tokenizer.word_positions(before, word).unwrap().unwrap();
        assert_eq!(pos.len(), 1, "{word} is one token of the tiny vocabulary");
        ctx.get(pos[0]).unwrap().to_vec1::<f32>().unwrap()
    };
    let (person, hair) = (
        at("a photo of a", "person"),
        at("a photo of a person with", "hair"),
    );
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut w = tensors::read(&file, &Device::Cpu).unwrap();
    engineer_unet(&mut w, proj, -mid, &person, &hair);
    tensors::write(&file, &w, None).unwrap();
    dir
}

/// Rewrites the tiny VAE encoder into a pointwise map: latent channel 0 is a function of
/// the red channel at the same place (centre taps only, residual branches and the
/// attention zeroed), so a picture's halves become two exact latent levels.
fn engineer_vae(w: &mut HashMap<String, Tensor>, gain: f32) {
    let names: Vec<String> = w
        .keys()
        .filter(|n| n.starts_with("encoder") || n.starts_with("quant_conv"))
        .cloned()
        .collect();
    for n in &names {
        if n.contains(".conv2.")
            || n.contains("attentions.0.to_out")
            || (n.ends_with(".bias") && !n.contains("norm"))
        {
            let v = zeros_like(&w[n]);
            put(w, n, v);
        } else if n.ends_with("conv_out.weight") {
            one_tap(w, n, &[(0, 0, gain)]);
        } else if n.contains("shortcut.weight")
            || n.contains("samplers.0.conv.weight")
            || n.ends_with("conv_in.weight")
            || n == "quant_conv.weight"
        {
            one_tap(w, n, &[(0, 0, 1.0)]);
        } else if n.ends_with("conv_norm_out.weight") {
            let v = vec![1.0; w[n].elem_count()];
            put(w, n, v);
        } else if n.ends_with("conv_norm_out.bias") {
            let v = zeros_like(&w[n]);
            put(w, n, v);
        }
    }
}

fn read_mask(p: &Path) -> Binary {
    let g = image::open(p).unwrap().to_luma8();
    Binary {
        width: g.width() as usize,
        height: g.height() as usize,
        bits: g.pixels().map(|p| p.0[0] >= 128).collect(),
    }
}

fn half(left: bool) -> Binary {
    Binary {
        width: 64,
        height: 64,
        bits: (0..64 * 64).map(|i| (i % 64 < 32) == left).collect(),
    }
}

fn masks(args: &[&str]) -> std::process::Output {
    run_bin("masks", args)
}

/// `masks` on `pair` with `model` at the tests' resolution, plus `more`.
fn masks_with(pair: &Path, model: &Path, more: &[&str]) -> std::process::Output {
    let (pair, model) = (pair.to_str().unwrap(), model.to_str().unwrap());
    let base = [
        "--instance-dir",
        pair,
        "--model",
        model,
        "--resolution",
        RES,
    ];
    masks(&[&base[..], more].concat())
}

#[test]
fn attention_masks_recover_the_region_the_model_attends_to() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = redblue_pair(tmp.path(), 2);
    let model = engineered_model(tmp.path(), &pair.join("0_person_k1.png"));
    let o = masks_with(&pair, &model, &["--json"]);
    ok(&o);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one JSON line per image");
    for line in &lines {
        let sample = line["sample"].as_u64().unwrap();
        let mask = read_mask(Path::new(line["mask"].as_str().unwrap()));
        // The concept (person) attends to the red half; the component (hair) to the blue.
        let iou = mask.iou(&half(sample == 0));
        assert!(iou >= 0.9, "{line}: IoU {iou} with the known region");
        assert_eq!(
            line["class_word"],
            if sample == 0 { "person" } else { "hair" }
        );
    }
    let preview = image::open(pair.join("masks/preview.png")).unwrap();
    assert!(preview.height() > 4 * 192, "the preview shows every image");
    // Train reads these masks back like hand-made ones (preview.png is not a mask).
    magictailor::data::PairDataset::load(
        &pair,
        64,
        magictailor::data::MaskPolicy::Required {
            model: "tiny-random".into(),
        },
        &Device::Cpu,
    )
    .unwrap();
}

/// The tiny random model's masks are noise, but the folder they make is real.
fn quick_masks(pair: &Path, more: &[&str]) -> std::process::Output {
    let args = [
        &[
            "--instance-dir",
            pair.to_str().unwrap(),
            "--model",
            "tiny-random",
            "--resolution",
            RES,
            "--quiet",
        ][..],
        more,
    ]
    .concat();
    masks(&args)
}

#[test]
fn existing_masks_are_kept_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::discs((64, 64), Format::Png, 1));
    let hand_made = read_bytes(&pair.join("masks/0_person_k1.png"));
    let o = quick_masks(&pair, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("masks already exist") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(read_bytes(&pair.join("masks/0_person_k1.png")), hand_made);
    assert!(
        !pair.join("masks/preview.png").exists(),
        "nothing written on refusal"
    );
    // --out elsewhere leaves the pair folder alone.
    let elsewhere = tmp.path().join("auto");
    ok(&quick_masks(&pair, &["--out", elsewhere.to_str().unwrap()]));
    assert!(elsewhere.join("1_hair_c1.png").is_file() && elsewhere.join("preview.png").is_file());
    ok(&quick_masks(&pair, &["--overwrite"]));
    assert_ne!(read_bytes(&pair.join("masks/0_person_k1.png")), hand_made);
    let left: Vec<_> = std::fs::read_dir(&pair)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "staging folders left: {left:?}");
}

#[test]
fn bad_input_is_refused_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], code: i32, want: &str| {
        let o = masks(args);
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(want),
            "wanted {want:?} in: {}",
            stderr(&o)
        );
    };
    let missing = tmp.path().join("nope+hair_c");
    refused(
        &["--instance-dir", missing.to_str().unwrap()],
        2,
        "does not exist",
    );
    let lonely = tmp.path().join("person_k");
    std::fs::create_dir(&lonely).unwrap();
    refused(
        &["--instance-dir", lonely.to_str().unwrap()],
        2,
        "person_k+hair_c",
    );
    let mut spec = PairSpec::discs((64, 64), Format::Png, 1);
    spec.masks = false;
    let pair = pair_folder(&tmp.path().join("p"), &spec);
    let p = pair.to_str().unwrap();
    refused(
        &["--instance-dir", p, "--refine", "grounded-sam"],
        2,
        "invalid value 'grounded-sam'",
    );
    let base = [
        "--instance-dir",
        p,
        "--model",
        "tiny-random",
        "--resolution",
        RES,
    ];
    refused(
        &[
            &base[..],
            &["--refine", "sam", "--sam-model", "/no/such/sam.safetensors"],
        ]
        .concat(),
        1,
        "--sam-model /no/such/sam.safetensors",
    );
    let not_sam = fixtures().join("lora_peft.safetensors");
    refused(
        &[
            &base[..],
            &["--refine", "sam", "--sam-model", not_sam.to_str().unwrap()],
        ]
        .concat(),
        1,
        "not usable SAM weights",
    );
    refused(
        &[&base[..], &["--timesteps", "5000"]].concat(),
        2,
        "--timesteps",
    );
    std::fs::write(pair.join("1_hair_c1.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    refused(&base, 2, "1_hair_c1.png");
    assert!(!pair.join("masks").exists(), "a failed run wrote masks/");
}

#[test]
fn sam_refines_with_box_and_point_prompts() {
    use magictailor::masks::sam::{prompts, Refiner};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("mobile_sam-tiny-vitt.safetensors");
    magictailor::testkit::models::write_sam(&file, 3).unwrap();
    // A folder holding one file loads like the file.
    let sam = Refiner::load(tmp.path().to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(sam.source, file);
    let px = Tensor::rand(-1f32, 1f32, (3, 64, 64), &Device::Cpu).unwrap();
    let mask = half(true);
    let map: Vec<f32> = (0..64 * 64).map(|i| (i % 64) as f32).collect();
    let (bbox, points) = prompts(&mask, &map);
    assert_eq!(bbox, [0.0, 0.0, 32.0, 64.0]);
    assert_eq!(points.len(), 2);
    let (proposals, scores) = sam.proposals(&px, bbox, &points).unwrap();
    assert_eq!(
        (proposals.len(), scores.len()),
        (3, 3),
        "SAM's three proposals"
    );
    assert!(proposals.iter().all(|p| (p.width, p.height) == (64, 64)));
    assert!(scores.iter().all(|s| s.is_finite()));
}

#[test]
fn masks_command_refines_with_sam() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = PairSpec::discs((64, 64), Format::Png, 1);
    spec.masks = false;
    let pair = pair_folder(tmp.path(), &spec);
    let sam = tmp.path().join("sam.safetensors");
    magictailor::testkit::models::write_sam(&sam, 3).unwrap();
    let o = quick_masks(
        &pair,
        &["--refine", "sam", "--sam-model", sam.to_str().unwrap()],
    );
    // Whether a random SAM's proposal or the attention mask wins, each image gets a
    // binary mask at its own size, and the preview shows them.
    ok(&o);
    for stem in ["0_person_k1", "1_hair_c1"] {
        let m = image::open(pair.join(format!("masks/{stem}.png")))
            .unwrap()
            .to_luma8();
        assert_eq!(m.dimensions(), (64, 64));
        assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        assert!(m.pixels().any(|p| p.0[0] == 255));
    }
    assert!(pair.join("masks/preview.png").is_file());
}

#[test]
fn train_without_masks_makes_them_first_with_the_same_code() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = redblue_pair(tmp.path(), 1);
    let model = engineered_model(tmp.path(), &pair.join("0_person_k1.png"));
    let out = tmp.path().join("run");
    let args = with_args(
        quiet_train_args(
            pair.to_str().unwrap(),
            out.to_str().unwrap(),
            model.to_str().unwrap(),
        ),
        &["--warmup-steps", "1", "--dsbal-steps", "1"],
    );
    ok(&run_bin("train", &args));
    assert!(
        !pair.join("masks").exists(),
        "the pair folder is left as it was"
    );
    assert!(out.join("masks/preview.png").is_file());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("magictailor.json")).unwrap())
            .unwrap();
    assert_eq!(record["masks"]["method"], "attention", "{record}");
    assert_eq!(record["masks"]["attention"]["resolution"], 64);
    // `magictailor masks` with its defaults writes the same bytes.
    let by_command = tmp.path().join("by-command");
    ok(&masks_with(
        &pair,
        &model,
        &["--out", by_command.to_str().unwrap(), "--quiet"],
    ));
    for stem in ["0_person_k1", "1_hair_c1"] {
        let file = format!("{stem}.png");
        assert_eq!(
            read_bytes(&out.join("masks").join(&file)),
            read_bytes(&by_command.join(&file)),
            "{file}"
        );
        assert!(read_mask(&out.join("masks").join(&file)).iou(&half(stem.starts_with('0'))) >= 0.9);
    }
    // --no-masks keeps its meaning, and says so in the record.
    let out2 = tmp.path().join("run2");
    let args = with_args(
        quiet_train_args(
            pair.to_str().unwrap(),
            out2.to_str().unwrap(),
            model.to_str().unwrap(),
        ),
        &["--warmup-steps", "1", "--dsbal-steps", "0", "--no-masks"],
    );
    ok(&run_bin("train", &args));
    assert!(!out2.join("masks").exists());
    let record = std::fs::read_to_string(out2.join("magictailor.json")).unwrap();
    assert!(record.contains("whole images"), "{record}");
}

/// Evaluation segments generated images the same way: every class word's own region on
/// one image (eval then takes the components out of the concept).
#[test]
fn word_regions_segment_one_image_into_concept_and_component() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = redblue_pair(tmp.path(), 1);
    let img = pair.join("0_person_k1.png");
    let model = engineered_model(tmp.path(), &img);
    let sd = StableDiffusion::load(model.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let px = magictailor::data::load_rgb(&img, 64, &Device::Cpu).unwrap();
    let opts = magictailor::masks::AttentionOptions {
        resolution: 64,
        ..Default::default()
    };
    assert!(magictailor::masks::pair::word_regions(&sd, &px, &[], &opts)
        .unwrap()
        .is_empty());
    let words = ["person".to_string(), "hair".to_string()];
    let regions = magictailor::masks::pair::word_regions(&sd, &px, &words, &opts).unwrap();
    assert_eq!(regions.len(), 2);
    assert!(
        regions[0].iou(&half(true)) >= 0.9,
        "concept: {}",
        regions[0].iou(&half(true))
    );
    assert!(
        regions[1].iou(&half(false)) >= 0.9,
        "component: {}",
        regions[1].iou(&half(false))
    );
}

/// A folder with some masks: `train` refuses it, suggesting `masks --missing` with the
/// run's own model; that makes only the missing masks and keeps the hand-made ones, and
/// then `train` takes the folder. With nothing missing it writes nothing.
#[test]
fn missing_masks_are_made_and_hand_made_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::discs((64, 64), Format::Png, 2));
    let kept = read_bytes(&pair.join("masks/0_person_k1.png"));
    let gone = pair.join("masks/1_hair_c2.png");
    std::fs::remove_file(&gone).unwrap();
    let out = tmp.path().join("run");
    let args = with_args(
        quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), "tiny-random"),
        &["--warmup-steps", "1", "--dsbal-steps", "1"],
    );
    let o = run_bin("train", &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let hint = format!(
        "magictailor masks --instance-dir {} --missing --model tiny-random",
        pair.display()
    );
    assert!(err.contains(&hint), "{err}");

    let o = quick_masks(&pair, &["--missing", "--json"]);
    ok(&o);
    let lines: Vec<serde_json::Value> = (String::from_utf8_lossy(&o.stdout).lines())
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("mask").is_some())
        .collect();
    assert_eq!(lines.len(), 1, "only the missing mask: {lines:?}");
    assert!(gone.is_file());
    assert_eq!(read_bytes(&pair.join("masks/0_person_k1.png")), kept);
    ok(&run_bin("train", &args));

    let o = quick_masks(&pair, &["--missing", "--json"]);
    ok(&o);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("\"mask\""));
}
