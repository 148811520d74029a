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
    // SDXL's text encoders.
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
