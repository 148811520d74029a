//! Parsers meet arbitrary bytes without panicking: every input below either loads or
//! returns an error, never a panic, whatever it holds.
//!
//! Inputs are valid files (fixtures) with random mutations (flipped, inserted and removed
//! bytes, truncation, a rewritten header length, random keys and shapes), so most cases
//! get past the first check and reach the deeper code. Each target runs
//! `MAGICTAILOR_FUZZ_CASES` cases (default 200, a few seconds in all); for a longer run:
//!
//! ```text
//! MAGICTAILOR_FUZZ_CASES=20000 cargo test --release --test robustness
//! ```

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::LoraSet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cases() -> usize {
    std::env::var("MAGICTAILOR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Runs `f` on `cases()` inputs from `make`; a panic fails the test naming the case
/// (rerun one case by its seed).
fn never_panics<T>(target: &str, make: impl Fn(&mut StdRng) -> T, f: impl Fn(T)) {
    for case in 0..cases() {
        let mut rng = StdRng::seed_from_u64(case as u64);
        let input = make(&mut rng);
        if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
            panic!("{target}: case {case} panicked");
        }
    }
}

/// A few random edits of `bytes`.
fn mutate(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        let n = bytes.len();
        match rng.random_range(0..6) {
            0 if n > 0 => bytes.truncate(rng.random_range(0..n)),
            1 if n > 0 => {
                let i = rng.random_range(0..n);
                bytes[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=n);
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                bytes.splice(i..i, extra);
            }
            3 if n > 1 => {
                let i = rng.random_range(0..n - 1);
                let j = rng.random_range(i + 1..n.min(i + 64) + 1);
                bytes.drain(i..j);
            }
            // A safetensors header length that lies.
            4 if n >= 8 => {
                let len: u64 = match rng.random_range(0..3) {
                    0 => rng.random(),
                    1 => rng.random_range(0..n as u64 + 16),
                    _ => u64::MAX - rng.random_range(0..16),
                };
                bytes[..8].copy_from_slice(&len.to_le_bytes());
            }
            _ => {
                // Text-level noise inside the JSON header: quotes, brackets, digits.
                let i = rng.random_range(0..=n);
                let tok = [b'"', b'{', b'}', b'[', b']', b',', b':', b'9', b'-', b'e'];
                bytes.insert(i, tok[rng.random_range(0..tok.len())]);
            }
        }
    }
    bytes
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A random key in one of the LoRA layouts we parse, some of them half right.
fn lora_key(rng: &mut StdRng, paths: &[String]) -> String {
    let path = &paths[rng.random_range(0..paths.len())];
    let pick = |rng: &mut StdRng, xs: &[&str]| xs[rng.random_range(0..xs.len())].to_string();
    let key = match rng.random_range(0..6) {
        0 => format!(
            "unet.{path}.{}",
            pick(
                rng,
                &["lora_A.weight", "lora_B.weight", "lora_A.default.weight"]
            )
        ),
        1 => format!(
            "lora_unet_{}.{}",
            path.replace('.', "_"),
            pick(rng, &["lora_down.weight", "lora_up.weight", "alpha"])
        ),
        2 => format!("{path}.lora.{}", pick(rng, &["down.weight", "up.weight"])),
        3 => format!(
            "{path}.processor.{}_lora.down.weight",
            pick(rng, &["to_q", "to_out", "x"])
        ),
        4 => pick(
            rng,
            &[
                "lora_te_text_model.x.lora_up.weight",
                "text_encoder.a.lora_A.weight",
                "",
                ".",
            ],
        ),
        _ => (0..rng.random_range(0..24))
            .map(|_| {
                pick(
                    rng,
                    &[
                        "lora",
                        "_",
                        ".",
                        "unet",
                        "A",
                        "down",
                        "weight",
                        "alpha",
                        "processor",
                    ],
                )
            })
            .collect(),
    };
    if rng.random_bool(0.1) {
        key.chars().rev().collect()
    } else {
        key
    }
}

/// A tensor of a random small shape (possibly empty, possibly scalar) and dtype.
fn random_tensor(rng: &mut StdRng) -> Tensor {
    let rank = rng.random_range(0..4);
    let dims: Vec<usize> = (0..rank).map(|_| rng.random_range(0..5)).collect();
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
    let dtype =
        [DType::F32, DType::F16, DType::BF16, DType::F64, DType::U8][rng.random_range(0..5)];
    t.to_dtype(dtype).unwrap()
}

fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

#[test]
fn safetensors_reading_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = [
        "lora_peft.safetensors",
        "learned_embeds.safetensors",
        "init_latents.safetensors",
    ]
    .map(|f| std::fs::read(fixtures().join(f)).unwrap());
    never_panics(
        "safetensors",
        |rng| {
            let seed = seeds[rng.random_range(0..seeds.len())].clone();
            mutate(rng, seed)
        },
        |bytes| {
            let f = write(tmp.path(), "x.safetensors", &bytes);
            let _ = magictailor::io::tensors::check(&f);
            let _ = magictailor::io::tensors::read(&f, &Device::Cpu);
            let _ = magictailor::io::tensors::metadata(&f, "lora_adapter_metadata");
        },
    );
}

#[test]
fn lora_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let targets = sd.unet.lora_targets();
    let paths: Vec<String> = targets.iter().map(|t| t.path.clone()).collect();
    let fixtures_bytes = [
        "lora_peft.safetensors",
        "lora_kohya.safetensors",
        "lora_diffusers_old.safetensors",
    ]
    .map(|f| std::fs::read(fixtures().join(f)).unwrap());
    never_panics(
        "LoRA",
        |rng| {
            if rng.random_bool(0.3) {
                let base = fixtures_bytes[rng.random_range(0..3)].clone();
                return mutate(rng, base);
            }
            let tensors: HashMap<String, Tensor> = (0..rng.random_range(0..6))
                .map(|_| (lora_key(rng, &paths), random_tensor(rng)))
                .collect();
            safetensors_bytes(&tensors)
        },
        |bytes| {
            let f = write(tmp.path(), "lora.safetensors", &bytes);
            let _ = LoraSet::load(&f, &targets, &Device::Cpu);
        },
    );
}

#[test]
fn embedding_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    never_panics(
        "embeddings",
        |rng| {
            let keys = ["<v0>", "emb_params", "*", "", "string_to_param", "<v1>"];
            let tensors: HashMap<String, Tensor> = (0..rng.random_range(0..4))
                .map(|_| {
                    (
                        keys[rng.random_range(0..keys.len())].to_string(),
                        random_tensor(rng),
                    )
                })
                .collect();
            let bytes = safetensors_bytes(&tensors);
            if rng.random_bool(0.3) {
                mutate(rng, bytes)
            } else {
                bytes
            }
        },
        |bytes| {
            let f = write(tmp.path(), "emb.safetensors", &bytes);
            let _ = magictailor::io::embeds::load(&f, 32, &Device::Cpu);
        },
    );
}

#[test]
fn run_records_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let valid = serde_json::json!({
        "base_model": "/models/sd", "tokens": {"<v0>": "person"}, "steps_done": 3,
        "config": {"seed": 0}, "magictailor_version": "0.1.0"
    })
    .to_string()
    .into_bytes();
    never_panics(
        "magictailor.json",
        |rng| mutate(rng, valid.clone()),
        |bytes| {
            std::fs::write(tmp.path().join("magictailor.json"), &bytes).unwrap();
            let _ = magictailor::io::run::open(tmp.path());
        },
    );
}

#[test]
fn the_tokenizer_takes_any_string() {
    let mut sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".to_string(), "<v1>".to_string()])
        .unwrap();
    let pieces = [
        "<v0>",
        "<v1>",
        "<v",
        ">",
        "<>",
        "<v9>",
        " ",
        "\u{0}",
        "é",
        "東京",
        "🦀",
        "\n\t",
        "a photo of",
    ];
    never_panics(
        "tokenizer",
        |rng| {
            (0..rng.random_range(0..40))
                .map(|_| match rng.random_range(0..3) {
                    0 => pieces[rng.random_range(0..pieces.len())].to_string(),
                    1 => char::from_u32(rng.random_range(0..0x11_0000))
                        .map_or(String::new(), String::from),
                    _ => "word ".repeat(rng.random_range(0..30)),
                })
                .collect::<String>()
        },
        |text| {
            if let Ok(ids) = sd.tokenizer.encode(&text) {
                assert_eq!(
                    ids.len(),
                    sd.tokenizer.max_len(),
                    "padded or cut to the context"
                );
            }
            let _ = sd.tokenizer.unknown_pseudo_words(&text);
        },
    );
}

#[test]
fn pair_folder_names_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = [
        "person", "_", "+", "k", " ", "__", "é", "1", "+_", "_+", "hair_c", ".",
    ];
    never_panics(
        "pair folder name",
        |rng| {
            (0..rng.random_range(1..10))
                .map(|_| parts[rng.random_range(0..parts.len())])
                .collect::<String>()
        },
        |name| {
            if name == "." || name == ".." {
                return;
            }
            let dir = tmp.path().join(&name);
            if std::fs::create_dir_all(&dir).is_ok() {
                let _ = magictailor::data::class_words(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
        },
    );
}
