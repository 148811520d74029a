//! Parity with diffusers/transformers/peft on the tiny model of each base family in
//! tests/fixtures (SD 2.x, and SD 1.x under sd1/), produced by
//! scripts/make_parity_fixtures.py. f32 on both sides: the same math, so the bounds are
//! tight (float reassociation only).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::infer::{Personalized, Sources};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::LoraSet;
use magictailor::model::nn::Ctx;
use magictailor::model::probe::{AttnProbe, BlockKind};
use magictailor::model::tokenizer::ClipTokenizer;

fn load(fam: &Family) -> StableDiffusion {
    StableDiffusion::load(&fam.model(), &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{}: tiny model loads: {e}", fam.name))
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
    for fam in &FAMILIES {
        let sd = load(fam);
        let want = fam.reference()["alphas_cumprod"].to_vec1::<f32>().unwrap();
        assert_eq!(sd.schedule.alphas_cumprod.len(), want.len());
        for (a, b) in sd.schedule.alphas_cumprod.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-7, "{}: {a} vs {b}", fam.name);
        }
    }
}

#[test]
fn tokenizer_matches_transformers_from_both_file_layouts() {
    for fam in &FAMILIES {
        let want = fam.reference()["token_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        // tokenizer.json, as transformers saved it.
        let dir = fam.path("tiny-sd/tokenizer");
        let tok = ClipTokenizer::load(&dir, 10_000, 77).unwrap();
        // vocab.json + merges.txt only, as CLIPTokenizer (slow) saves it.
        let slow = tempfile::tempdir().unwrap();
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), slow.path().join(f)).unwrap();
        }
        let tok_slow = ClipTokenizer::load(slow.path(), 10_000, 77).unwrap();
        for (p, w) in PROMPTS.iter().zip(&want) {
            assert_eq!(
                &tok.encode(p).unwrap(),
                w,
                "{} tokenizer.json: {p:?}",
                fam.name
            );
            assert_eq!(
                &tok_slow.encode(p).unwrap(),
                w,
                "{} vocab+merges: {p:?}",
                fam.name
            );
        }
    }
    // The families pad differently: SD 2.x with "!", SD 1.x with end-of-text.
    let last = |fam: &Family| fam.reference()["token_ids"].to_vec2::<i64>().unwrap()[0][76];
    assert_ne!(last(&SD1), last(&SD2));
}

#[test]
fn text_encoder_matches_transformers() {
    for fam in &FAMILIES {
        let sd = load(fam);
        let r = fam.reference();
        let ids: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| sd.tokenizer.encode(p).unwrap())
            .collect();
        let got = sd.text_encoder.forward(&ids_tensor(&ids), None).unwrap();
        let d = max_abs_diff(&got, &r["te_hidden"]);
        assert!(
            d < 2e-5,
            "{}: text encoder max |diff| {d} (values up to {})",
            fam.name,
            max_abs(&r["te_hidden"])
        );
    }
}

#[test]
fn pseudo_words_match_textual_inversion() {
    for fam in &FAMILIES {
        let r = fam.reference();
        let src = Sources {
            model: fam.model(),
            embeds: Some(fam.path("learned_embeds.safetensors")),
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
        assert_eq!(ids, want_ids[0], "{}", fam.name);
        let got = p.weights().encode_prompts(&[prompt]).unwrap();
        let d = max_abs_diff(&got, &r["te_hidden_pseudo"]);
        assert!(
            d < 2e-5,
            "{}: pseudo-word text features max |diff| {d}",
            fam.name
        );
    }
}

fn unet_inputs(r: &HashMap<String, Tensor>) -> (Tensor, Tensor, Tensor) {
    (
        r["unet_x"].clone(),
        r["unet_t"].clone(),
        r["te_hidden"].narrow(0, 0, 2).unwrap(),
    )
}

#[test]
fn unet_matches_diffusers_with_per_sample_timesteps() {
    for fam in &FAMILIES {
        let sd = load(fam);
        let r = fam.reference();
        let (x, t, ctx) = unet_inputs(&r);
        let got = sd.unet.forward(&x, &t, &ctx, Ctx::default()).unwrap();
        let want = &r["unet_out"];
        let d = max_abs_diff(&got, want);
        assert!(
            d < 5e-5,
            "{}: U-Net max |diff| {d} (values up to {})",
            fam.name,
            max_abs(want)
        );
    }
}

#[test]
fn cross_attention_probe_matches_diffusers() {
    for fam in &FAMILIES {
        let sd = load(fam);
        let r = fam.reference();
        let (x, t, ctx) = unet_inputs(&r);
        let probe = AttnProbe::new(&[4], &[BlockKind::Down]);
        let ctx_probe = Ctx {
            probe: Some(&probe),
            ..Ctx::default()
        };
        sd.unet.forward(&x, &t, &ctx, ctx_probe).unwrap();
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
        let d = max_abs_diff(&maps[0].1, &r["attn_probs"]);
        assert!(
            d < 1e-5,
            "{}: attention probabilities max |diff| {d}",
            fam.name
        );
    }
}

#[test]
fn lora_in_every_layout_matches_peft() {
    for fam in &FAMILIES {
        let sd = load(fam);
        let r = fam.reference();
        let (x, t, ctx) = unet_inputs(&r);
        let want = &r["unet_lora_out"];
        let base = sd.unet.forward(&x, &t, &ctx, Ctx::default()).unwrap();
        assert!(
            max_abs_diff(&base, want) > 1e-2,
            "the reference LoRA must change the output"
        );
        let targets = sd.unet.lora_targets();
        // 16 transformers (3x2 down, 1 mid, 3x3 up), each with proj_in, proj_out, ff.net.2
        // and to_q/to_k/to_v/to_out.0 in two attentions: 11 adapted layers (SD 1.x's
        // projections are 1x1 convolutions, their adapters 4-D).
        assert_eq!(targets.len(), 16 * 11);
        for file in [
            "lora_peft.safetensors",
            "lora_kohya.safetensors",
            "lora_diffusers_old.safetensors",
        ] {
            let set = LoraSet::load(&fam.path(file), &targets, &Device::Cpu).unwrap();
            assert_eq!(set.len(), targets.len(), "{file}: every target adapted");
            let with_lora = Ctx {
                lora: Some(&set),
                ..Ctx::default()
            };
            let got = sd.unet.forward(&x, &t, &ctx, with_lora).unwrap();
            let d = max_abs_diff(&got, want);
            assert!(d < 5e-5, "{} {file}: U-Net+LoRA max |diff| {d}", fam.name);
        }
    }
}

#[test]
fn vae_matches_diffusers() {
    for fam in &FAMILIES {
        let sd = load(fam);
        let r = fam.reference();
        let dist = sd.vae.encode(&r["vae_in"]).unwrap();
        let dm = max_abs_diff(&dist.mean, &r["vae_mean"]);
        let ds = max_abs_diff(&dist.std, &r["vae_std"]);
        let dec = sd.vae.decode(&r["vae_z"]).unwrap();
        let dd = max_abs_diff(&dec, &r["vae_decoded"]);
        assert!(
            dm < 2e-5 && ds < 2e-5 && dd < 2e-5,
            "{}: VAE mean {dm}, std {ds}, decode {dd}",
            fam.name
        );
    }
}

/// DDIM inversion against diffusers' `DDIMInverseScheduler` (scripts/make_inversion_fixture.py):
/// the inverted latent, without and with guidance; and DDIM sampling from the
/// inverted latent gives back what diffusers' does. On the tiny random model the
/// round trip is far from the start (3.75 at most; |z0| up to 1.42): its noise estimates
/// are not those of a trained model, the approximation inversion rests on.
#[test]
fn ddim_inversion_matches_diffusers() {
    let r =
        candle_core::safetensors::load(fixtures().join("ddim_inversion.safetensors"), &Device::Cpu)
            .unwrap();
    let src = Sources {
        model: tiny_sd(),
        ..Default::default()
    };
    let p = Personalized::load(&src, &Device::Cpu, DType::F32).unwrap();
    let z0 = r["z0"].clone();
    for (guidance, tag) in [(1.0, "g1"), (3.0, "g3")] {
        let cond = p
            .weights()
            .condition("a photo of a dog", "", guidance)
            .unwrap();
        let inverted = magictailor::infer::invert(&cond, z0.clone(), 10).unwrap();
        let d = max_abs_diff(&inverted, &r[&format!("inverted_{tag}")]);
        assert!(
            d < 1e-4,
            "guidance {guidance}: inverted latent max |diff| {d}"
        );
        let back = magictailor::infer::denoise(&cond, None, inverted, 10, || {}).unwrap();
        let e = max_abs_diff(&back, &r[&format!("reconstructed_{tag}")]);
        assert!(
            e < 1e-4,
            "guidance {guidance}: reconstruction max |diff| {e}"
        );
        eprintln!("guidance {guidance}: inverted {d:e}, reconstructed {e:e} from diffusers'");
    }
}
