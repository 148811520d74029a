//! LoRA and embedding files written here read back identically, in every layout we write.
//! The written files are also left in `$CARGO_TARGET_TMPDIR/export-check/`, where
//! `scripts/check_rust_exports.py` loads them into diffusers (run by hand).

mod common;

use candle_core::{DType, Device};
use common::*;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::LoraSet;
use magictailor::model::nn::Ctx;

#[test]
fn lora_round_trips_through_peft_and_kohya_files() {
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let targets = sd.unet.lora_targets();
    let original = LoraSet::load(
        &fixtures().join("lora_peft.safetensors"),
        &targets,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        original.rank_alpha(),
        Some((4, 8.0)),
        "alpha read from diffusers' adapter metadata"
    );
    let r = reference();
    let (x, t, ctx) = (
        &r["unet_x"],
        &r["unet_t"],
        r["te_hidden"].narrow(0, 0, 2).unwrap(),
    );
    let forward = |set: &LoraSet| {
        sd.unet
            .forward(
                x,
                t,
                &ctx,
                Ctx {
                    lora: Some(set),
                    ..Ctx::default()
                },
            )
            .unwrap()
    };
    let want = forward(&original);

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export-check");
    std::fs::create_dir_all(&dir).unwrap();
    let peft = dir.join("pytorch_lora_weights.safetensors");
    let kohya = dir.join("lora_kohya.safetensors");
    original.save_peft(&peft, &targets).unwrap();
    original.save_kohya(&kohya, &targets, false).unwrap();

    // Pure peft keys, nothing else (diffusers silently drops modules from mixed files).
    let saved = candle_core::safetensors::load(&peft, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 2 * targets.len());
    assert!(saved.keys().all(|k| k.starts_with("unet.")
        && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));
    let kohya_keys = candle_core::safetensors::load(&kohya, &Device::Cpu).unwrap();
    assert_eq!(
        kohya_keys.len(),
        3 * targets.len(),
        "down, up and alpha per module"
    );

    for file in [&peft, &kohya] {
        let back = LoraSet::load(file, &targets, &Device::Cpu).unwrap();
        assert_eq!(back.rank_alpha(), Some((4, 8.0)), "{}", file.display());
        assert_eq!(
            max_abs_diff(&forward(&back), &want),
            0.0,
            "{}",
            file.display()
        );
    }
}

#[test]
fn embeddings_round_trip_and_export_for_a1111() {
    let file = fixtures().join("learned_embeds.safetensors");
    let embeds = magictailor::io::embeds::load(&file, 32, &Device::Cpu).unwrap();
    assert_eq!(
        embeds.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["<v0>", "<v1>"]
    );
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export-check");
    let out = dir.join("learned_embeds.safetensors");
    magictailor::io::embeds::save(&out, &embeds).unwrap();
    let back = magictailor::io::embeds::load(&out, 32, &Device::Cpu).unwrap();
    for ((ta, va), (tb, vb)) in embeds.iter().zip(&back) {
        assert_eq!(ta, tb);
        assert_eq!(max_abs_diff(va, vb), 0.0);
    }
    let a1111 = magictailor::io::embeds::save_a1111(&dir.join("a1111"), &embeds).unwrap();
    assert_eq!(a1111.len(), 2);
    let v0 = magictailor::io::embeds::load(&a1111[0], 32, &Device::Cpu).unwrap();
    assert_eq!(v0[0].0, "<v0>", "the A1111 file's token is its name");
    assert_eq!(max_abs_diff(&v0[0].1, &embeds[0].1), 0.0);
    // Wrong width is refused with the file named.
    let err = magictailor::io::embeds::load(&file, 1024, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("learned_embeds.safetensors") && err.contains("1024"),
        "{err}"
    );
}

/// Library callers can tell failures apart by variant: weights for another model
/// (wrong shapes, or a layer this U-Net does not have) are `Mismatch`, a file that is
/// not safetensors is `BadFile`, and a model folder that does not exist (or is not a
/// diffusers folder) is `ModelNotFound`. Each message names the file or folder.
#[test]
fn wrong_files_and_missing_models_give_their_error_variants() {
    use magictailor::Error;
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F32).unwrap();
    let targets = sd.unet.lora_targets();
    let peft =
        candle_core::safetensors::load(fixtures().join("lora_peft.safetensors"), &dev).unwrap();
    let rewritten =
        |name: &str, edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)| {
            let mut t = peft.clone();
            edit(&mut t);
            let p = tmp.path().join(name);
            candle_core::safetensors::save(&t, &p).unwrap();
            p
        };

    // One adapter 3 columns wider than its layer, as from a wider model.
    let wide = rewritten("wide.safetensors", &|t| {
        let key = t
            .keys()
            .find(|k| k.ends_with(".lora_A.weight"))
            .unwrap()
            .clone();
        let a = &t[&key];
        let (r, c) = a.dims2().unwrap();
        let wider = candle_core::Tensor::zeros((r, c + 3), a.dtype(), &Device::Cpu).unwrap();
        t.insert(key, wider);
    });
    // One adapter moved to a layer this U-Net does not have.
    let elsewhere = rewritten("elsewhere.safetensors", &|t| {
        let key = t
            .keys()
            .find(|k| k.ends_with(".lora_A.weight"))
            .unwrap()
            .clone();
        let stem = key.trim_end_matches(".lora_A.weight").to_string();
        for part in ["lora_A", "lora_B"] {
            let v = t.remove(&format!("{stem}.{part}.weight")).unwrap();
            t.insert(
                format!("unet.mid_block.attentions.7.extra.{part}.weight"),
                v,
            );
        }
    });
    for file in [&wide, &elsewhere] {
        match LoraSet::load(file, &targets, &dev) {
            Err(e @ Error::Mismatch { .. }) => {
                let name = file.file_name().unwrap().to_str().unwrap();
                assert!(e.to_string().contains(name), "{e}");
            }
            Err(e) => panic!("{}: expected Error::Mismatch, got {e:?}", file.display()),
            Ok(_) => panic!("{}: a LoRA for another model loaded", file.display()),
        }
    }

    let text = tmp.path().join("notes.safetensors");
    std::fs::write(&text, "this is not a safetensors file, just some text").unwrap();
    match LoraSet::load(&text, &targets, &dev) {
        Err(e @ Error::BadFile { .. }) => {
            assert!(e.to_string().contains("notes.safetensors"), "{e}")
        }
        Err(e) => panic!("expected Error::BadFile, got {e:?}"),
        Ok(_) => panic!("a text file loaded as a LoRA"),
    }

    let missing = tmp.path().join("no-such-model");
    let not_a_model = tmp.path().join("empty-folder");
    std::fs::create_dir(&not_a_model).unwrap();
    for dir in [&missing, &not_a_model] {
        match StableDiffusion::load(dir.to_str().unwrap(), &dev, DType::F32) {
            Err(e @ Error::ModelNotFound(_)) => {
                assert!(e.to_string().contains(dir.to_str().unwrap()), "{e}")
            }
            Err(e) => panic!(
                "{}: expected Error::ModelNotFound, got {e:?}",
                dir.display()
            ),
            Ok(_) => panic!("{}: loaded as a model", dir.display()),
        }
    }
}
