//! Parity with diffusers/transformers/peft on the tiny model in tests/fixtures, produced
//! by scripts/make_parity_fixtures.py. f32 on both sides: the same math, so the bounds
//! are tight (float reassociation only).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::infer::{Personalized, Sources};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::LoraSet;
use magictailor::model::nn::Ctx;
use magictailor::model::probe::{AttnProbe, BlockKind};
use magictailor::model::tokenizer::ClipTokenizer;

fn load() -> StableDiffusion {
    StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).expect("tiny model loads")
}

fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    let n = ids[0].len();
    Tensor::from_vec(ids.concat(), (ids.len(), n), &Device::Cpu).unwrap()
}

const PROMPTS: [&str; 3] = [
    "a photo of a dog",
    "",
    "A  Photo of the RED cat, in snow!! 123",
];

#[test]
fn schedule_matches_diffusers() {
    let sd = load();
    let want = reference()["alphas_cumprod"].to_vec1::<f32>().unwrap();
    assert_eq!(sd.schedule.alphas_cumprod.len(), want.len());
    for (a, b) in sd.schedule.alphas_cumprod.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
    }
}

#[test]
fn tokenizer_matches_transformers_from_both_file_layouts() {
    let want = reference()["token_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    // tokenizer.json, as transformers saved it.
    let dir = fixtures().join("tiny-sd/tokenizer");
    let tok = ClipTokenizer::load(&dir, 10_000, 77).unwrap();
    // vocab.json + merges.txt only, as CLIPTokenizer (slow) saves it.
    let slow = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), slow.path().join(f)).unwrap();
    }
    let tok_slow = ClipTokenizer::load(slow.path(), 10_000, 77).unwrap();
    for (p, w) in PROMPTS.iter().zip(&want) {
        assert_eq!(&tok.encode(p).unwrap(), w, "tokenizer.json: {p:?}");
        assert_eq!(&tok_slow.encode(p).unwrap(), w, "vocab+merges: {p:?}");
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let sd = load();
    let r = reference();
    let ids: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    let got = sd.text_encoder.forward(&ids_tensor(&ids), None).unwrap();
    let d = max_abs_diff(&got, &r["te_hidden"]);
    assert!(
        d < 2e-5,
        "text encoder max |diff| {d} (values up to {})",
        max_abs(&r["te_hidden"])
    );
}

#[test]
fn pseudo_words_match_textual_inversion() {
    let r = reference();
    let embeds = fixtures().join("learned_embeds.safetensors");
    let src = Sources {
        model: tiny_sd(),
        embeds: Some(embeds),
        ..Default::default()
    };
    let p = Personalized::load(&src, &Device::Cpu, DType::F32).unwrap();
    let prompt = "<v0> with <v1>, in the snow";
    let ids = p.sd.tokenizer.encode(prompt).unwrap();
    let want_ids = r["pseudo_token_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    assert_eq!(ids, want_ids[0]);
    let got = p.weights().encode_prompts(&[prompt]).unwrap();
    let d = max_abs_diff(&got, &r["te_hidden_pseudo"]);
    assert!(d < 2e-5, "pseudo-word text features max |diff| {d}");
}

fn unet_inputs() -> (Tensor, Tensor, Tensor) {
    let r = reference();
    (
        r["unet_x"].clone(),
        r["unet_t"].clone(),
        r["te_hidden"].narrow(0, 0, 2).unwrap(),
    )
}

#[test]
fn unet_matches_diffusers_with_per_sample_timesteps() {
    let sd = load();
    let (x, t, ctx) = unet_inputs();
    let got = sd.unet.forward(&x, &t, &ctx, Ctx::default()).unwrap();
    let want = &reference()["unet_out"];
    let d = max_abs_diff(&got, want);
    assert!(
        d < 5e-5,
        "U-Net max |diff| {d} (values up to {})",
        max_abs(want)
    );
}

#[test]
fn cross_attention_probe_matches_diffusers() {
    let sd = load();
    let (x, t, ctx) = unet_inputs();
    let probe = AttnProbe::new(&[4], &[BlockKind::Down]);
    sd.unet
        .forward(
            &x,
            &t,
            &ctx,
            Ctx {
                probe: Some(&probe),
                ..Ctx::default()
            },
        )
        .unwrap();
    let maps = probe.take();
    let names: Vec<&str> = maps.iter().map(|(n, _)| n.as_str()).collect();
    // Down block 1 holds two transformers at 4x4 (layers_per_block = 2).
    assert_eq!(
        names,
        [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
        ]
    );
    let d = max_abs_diff(&maps[0].1, &reference()["attn_probs"]);
    assert!(d < 1e-5, "attention probabilities max |diff| {d}");
}

#[test]
fn lora_in_every_layout_matches_peft() {
    let sd = load();
    let (x, t, ctx) = unet_inputs();
    let want = &reference()["unet_lora_out"];
    let base = sd.unet.forward(&x, &t, &ctx, Ctx::default()).unwrap();
    assert!(
        max_abs_diff(&base, want) > 1e-2,
        "the reference LoRA must change the output"
    );
    let targets = sd.unet.lora_targets();
    // 16 transformers (3x2 down, 1 mid, 3x3 up), each with proj_in, proj_out, ff.net.2 and
    // to_q/to_k/to_v/to_out.0 in two attentions: 11 adapted linears.
    assert_eq!(targets.len(), 16 * 11);
    for file in [
        "lora_peft.safetensors",
        "lora_kohya.safetensors",
        "lora_diffusers_old.safetensors",
    ] {
        let set = LoraSet::load(&fixtures().join(file), &targets, &Device::Cpu).unwrap();
        assert_eq!(set.len(), targets.len(), "{file}: every target adapted");
        let got = sd
            .unet
            .forward(
                &x,
                &t,
                &ctx,
                Ctx {
                    lora: Some(&set),
                    ..Ctx::default()
                },
            )
            .unwrap();
        let d = max_abs_diff(&got, want);
        assert!(d < 5e-5, "{file}: U-Net+LoRA max |diff| {d}");
    }
}

#[test]
fn vae_matches_diffusers() {
    let sd = load();
    let r = reference();
    let dist = sd.vae.encode(&r["vae_in"]).unwrap();
    let dm = max_abs_diff(&dist.mean, &r["vae_mean"]);
    let ds = max_abs_diff(&dist.std, &r["vae_std"]);
    let dec = sd.vae.decode(&r["vae_z"]).unwrap();
    let dd = max_abs_diff(&dec, &r["vae_decoded"]);
    assert!(
        dm < 2e-5 && ds < 2e-5 && dd < 2e-5,
        "VAE mean {dm}, std {ds}, decode {dd}"
    );
}
