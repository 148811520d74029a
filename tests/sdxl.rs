//! SDXL's pieces against diffusers/transformers on a tiny SDXL pipeline
//! (scripts/make_sdxl_fixtures.py): the two tokenizers (padding differently), each text
//! encoder's penultimate hidden states, the second's projected pooled output, and the
//! U-Net with its added size-and-text conditioning. The pipeline itself (both encoders
//! in prompts, `train`/`infer`) is not built yet: loading an SDXL folder is refused.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use magictailor::model::clip::ClipTextModel;
use magictailor::model::config::{read_json, ClipTextConfig, UNetConfig};
use magictailor::model::nn::{AddedCond, Ctx};
use magictailor::model::tokenizer::ClipTokenizer;
use magictailor::model::unet::UNet;

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

#[test]
fn an_sdxl_folder_is_refused_by_name() {
    let e = magictailor::model::loader::StableDiffusion::load(
        fixtures().join("sdxl/tiny-sdxl").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .expect("SDXL is refused");
    assert!(e.to_string().contains("SDXL"), "{e}");
}
