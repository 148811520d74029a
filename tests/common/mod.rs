//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_sd() -> String {
    fixtures().join("tiny-sd").to_string_lossy().into_owned()
}

pub fn reference() -> HashMap<String, Tensor> {
    SD2.reference()
}

/// One base family's parity fixtures (scripts/make_parity_fixtures.py): a tiny model in
/// `DIR/tiny-sd` and what diffusers computed on it, under the same file names per family.
pub struct Family {
    pub name: &'static str,
    dir: &'static str,
}

/// SD 2.x (linear projections, GELU text encoder, "!" padding) at the top of tests/fixtures.
pub const SD2: Family = Family {
    name: "SD 2.x",
    dir: "",
};
/// SD 1.x (1x1-conv projections, quick_gelu, 8 heads, end-of-text padding) under sd1/.
pub const SD1: Family = Family {
    name: "SD 1.x",
    dir: "sd1",
};
pub const FAMILIES: [Family; 2] = [SD2, SD1];

impl Family {
    pub fn path(&self, name: &str) -> PathBuf {
        fixtures().join(self.dir).join(name)
    }
    /// A fixture file's path as the string a command line takes.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    pub fn model(&self) -> String {
        self.arg("tiny-sd")
    }
    /// `magictailor infer` as the family's reference images were drawn: its fixture
    /// latents, 10 DDIM steps, guidance 7.5, 64 px; `model` selects the weights
    /// (`--model DIR`, `--model-dir DIR`, plus any extras).
    pub fn infer_like_reference(&self, model: &[&str], out: &Path, prompt: &str) -> Output {
        let latents = self.arg("init_latents.safetensors");
        let mut args = vec![
            "--init-latents",
            &latents,
            "--steps",
            "10",
            "--guidance",
            "7.5",
        ];
        args.extend([
            "--width", "64", "--height", "64", "--quiet", "--prompt", prompt,
        ]);
        args.extend(["--out", out.to_str().expect("a UTF-8 path")]);
        args.extend(model);
        run_bin("infer", &args)
    }

    /// `--model`, `--lora` and `--embeds` of the fixture model, LoRA and pseudo-words.
    pub fn personal_args(&self) -> Vec<String> {
        let (lora, embeds) = ("lora_peft.safetensors", "learned_embeds.safetensors");
        let args = [
            "--model",
            &self.model(),
            "--lora",
            &self.arg(lora),
            "--embeds",
            &self.arg(embeds),
        ];
        args.iter().map(|a| a.to_string()).collect()
    }

    pub fn reference(&self) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(self.path("parity.safetensors"), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{} parity fixture: {e}", self.name))
    }
}

/// Largest |a - b| over all elements; largest |x| (to show a difference is small relative
/// to the values).
#[allow(unused_imports)] // not every test binary uses them
pub use magictailor::testkit::tolerance::{max_abs, max_abs_diff};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magictailor"))
}

pub fn read_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Largest per-channel difference between two images of the same size.
pub fn png_max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The text chunks of a PNG, by keyword, read with the png crate's own decoder.
pub fn png_text(path: &Path) -> std::collections::HashMap<String, String> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let mut out = std::collections::HashMap::new();
    for t in &info.uncompressed_latin1_text {
        out.insert(t.keyword.clone(), t.text.clone());
    }
    for t in &info.utf8_text {
        out.insert(t.keyword.clone(), t.get_text().unwrap());
    }
    out
}

/// The path of a fixture file, as the string a command line takes.
pub fn fixture(name: &str) -> String {
    fixtures().join(name).to_string_lossy().into_owned()
}

// ---- Running the binary -------------------------------------------------------------

/// `magictailor SUBCOMMAND ARGS...`, offline (nothing may reach the hub), not yet run:
/// for the rare test that needs its own working directory or environment.
pub fn bin_command(subcommand: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg(subcommand).args(args).env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs `magictailor SUBCOMMAND ARGS...` offline and returns what it did.
pub fn run_bin(subcommand: &str, args: &[&str]) -> Output {
    bin_command(subcommand, args)
        .output()
        .expect("the magictailor binary runs")
}

/// `train` on `pair` into `out` with `model` at 64 px, quiet; callers add the steps.
pub fn quiet_train_args<'a>(pair: &'a str, out: &'a str, model: &'a str) -> Vec<&'a str> {
    let paths = ["--instance-dir", pair, "--out-dir", out, "--model", model];
    let mut args = paths.to_vec();
    args.extend(["--resolution", "64", "--quiet"]);
    args
}

/// The usual short run: `train` with 4 warm-up + 4 DS-Bal steps at 64 px, quiet, a
/// checkpoint every 3 steps (after steps 3, 4 and 6).
pub fn short_run_args<'a>(pair: &'a str, out: &'a str, model: &'a str) -> Vec<&'a str> {
    let steps = [
        "--warmup-steps",
        "4",
        "--dsbal-steps",
        "4",
        "--checkpoint-every",
        "3",
    ];
    with_args(quiet_train_args(pair, out, model), &steps)
}

/// `args` followed by `more`.
pub fn with_args<'a>(mut args: Vec<&'a str>, more: &[&'a str]) -> Vec<&'a str> {
    args.extend_from_slice(more);
    args
}

/// Replaces the value that follows `flag` in `args`.
pub fn set_arg<'a>(args: &mut [&'a str], flag: &str, value: &'a str) {
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag}"));
    args[i + 1] = value;
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command succeeded, showing its stderr if not.
pub fn ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// A file's bytes, naming it if it cannot be read.
pub fn read_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The bytes of a run folder's adapters and embeddings, to compare two runs.
pub fn trained_weights(out: &Path) -> Vec<Vec<u8>> {
    [
        "pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
    ]
    .map(|f| read_bytes(&out.join(f)))
    .to_vec()
}

/// `train_log.jsonl` of a run folder, one JSON value per line.
pub fn read_log(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("train_log.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Keeps the first `keep` bytes of a file (a download or copy cut short).
pub fn truncate_file(path: &Path, keep: usize) {
    let bytes = read_bytes(path);
    assert!(
        keep < bytes.len(),
        "{} has only {} bytes",
        path.display(),
        bytes.len()
    );
    std::fs::write(path, &bytes[..keep]).unwrap();
}

// ---- Pair folders ---------------------------------------------------------------------

/// Pair folders (`PairSpec`, `pair_folder`, `write_image`, `write_mask`): the test kit's.
#[allow(unused_imports)] // not every test binary writes pairs
pub use magictailor::testkit::pairs::*;

/// A trained-looking folder `root/trained`: the fixture LoRA and embeddings, class words
/// person/hair on the tiny model; `extra` fields are merged into its magictailor.json.
pub fn fixture_run(root: &Path, extra: serde_json::Value) -> PathBuf {
    let dir = root.join("trained");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |from: &str, to: &str| std::fs::copy(fixtures().join(from), dir.join(to)).unwrap();
    copy("lora_peft.safetensors", "pytorch_lora_weights.safetensors");
    copy("learned_embeds.safetensors", "learned_embeds.safetensors");
    let mut record = serde_json::json!({
        "base_model": tiny_sd(), "tokens": {"<v0>": "person", "<v1>": "hair"}
    });
    if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    std::fs::write(dir.join("magictailor.json"), record.to_string()).unwrap();
    dir
}

/// A fresh `target/tmp/{name}/` for scripts/check_rust_exports.py, holding the A1111
/// words of the trained folder `out` and `infer`'s image of `prompt` from the fixed
/// latents (10 steps, 64 px) as `infer.png`.
pub fn leave_check(out: &Path, name: &str, prompt: &str) -> PathBuf {
    let check = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    copy_dir(&out.join("embeddings"), &check.join("embeddings"));
    let latents = fixtures().join("init_latents.safetensors");
    let png = check.join("infer.png");
    let mut a = vec!["--model-dir", out.to_str().unwrap(), "--prompt", prompt];
    a.extend(["--init-latents", latents.to_str().unwrap(), "--steps", "10"]);
    a.extend(["--width", "64", "--height", "64", "--quiet"]);
    a.extend(["--out", png.to_str().unwrap()]);
    ok(&run_bin("infer", &a));
    check
}
