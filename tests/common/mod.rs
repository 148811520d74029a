//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use image::{ImageBuffer, Luma, Rgb, Rgba};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_sd() -> String {
    fixtures().join("tiny-sd").to_string_lossy().into_owned()
}

pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("parity.safetensors"), &Device::Cpu)
        .expect("parity fixture")
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

/// What an image shows. Its mask marks the picture's "object".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Picture {
    /// A disc of this colour (radius 5/16 of the short side) on a sky-blue background,
    /// centred but moved right by the image's number (1, 2, ...) so no two are equal.
    /// The object is the disc.
    Disc([u8; 3]),
    /// Left half red, right half blue. The object is the red half.
    RedBlue,
}

/// How an image file is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    Png,
    /// 16-bit RGBA PNG (alpha 30000 of 65535), to check alpha and depth are dropped.
    Png16Rgba,
    Jpeg,
    /// A JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6).
    JpegRotated,
    /// Lossless WebP.
    WebP,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png | Format::Png16Rgba => "png",
            Format::Jpeg | Format::JpegRotated => "jpg",
            Format::WebP => "webp",
        }
    }
}

/// One reference image of a pair folder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairImage {
    pub size: (u32, u32),
    pub format: Format,
    pub picture: Picture,
}

/// A pair folder in the published layout: `{names joined by +}/{s}_{name}{k}.{ext}` for
/// sample `s` and image `k` (from 1), masks as `masks/{s}_{name}{k}.png`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSpec {
    /// Per sample: its `{class}_{id}` name and its images.
    pub samples: Vec<(&'static str, Vec<PairImage>)>,
    /// Write a mask per image (white = the picture's object).
    pub masks: bool,
    /// The masks' size; `None`: each image's own size.
    pub mask_size: Option<(u32, u32)>,
    /// Also write `masks/others/unrelated.png` (all black), which the loader must ignore.
    pub other_masks: bool,
}

impl PairSpec {
    /// person_k+hair_c: `per_sample` discs per sample (skin-coloured person, dark hair),
    /// each with its disc as mask.
    pub fn discs(size: (u32, u32), format: Format, per_sample: usize) -> Self {
        let disc = |colour| PairImage {
            size,
            format,
            picture: Picture::Disc(colour),
        };
        Self {
            samples: vec![
                ("person_k", vec![disc([200, 150, 120]); per_sample]),
                ("hair_c", vec![disc([40, 30, 20]); per_sample]),
            ],
            masks: true,
            mask_size: None,
            other_masks: false,
        }
    }

    /// The training tests' folder: 2 + 2 discs, 80x64 PNG, masked.
    pub fn training() -> Self {
        Self::discs((80, 64), Format::Png, 2)
    }

    /// The file name of image `k` (from 1) of sample `s`, without extension.
    pub fn stem(&self, s: usize, k: usize) -> String {
        format!("{s}_{}{k}", self.samples[s].0)
    }
}

/// Writes the pair folder `spec` describes under `root` and returns its path.
pub fn pair_folder(root: &Path, spec: &PairSpec) -> PathBuf {
    let name: Vec<&str> = spec.samples.iter().map(|(n, _)| *n).collect();
    let dir = root.join(name.join("+"));
    std::fs::create_dir_all(&dir).unwrap();
    if spec.masks {
        std::fs::create_dir_all(dir.join("masks")).unwrap();
    }
    if spec.other_masks {
        std::fs::create_dir_all(dir.join("masks/others")).unwrap();
    }
    for (s, (_, images)) in spec.samples.iter().enumerate() {
        for (i, img) in images.iter().enumerate() {
            let k = i + 1;
            let stem = spec.stem(s, k);
            let file = dir.join(format!("{stem}.{}", img.format.extension()));
            write_image(&file, img.size, img.format, img.picture, k as u32);
            if spec.masks {
                let (w, h) = spec.mask_size.unwrap_or(img.size);
                write_mask(
                    &dir.join(format!("masks/{stem}.png")),
                    w,
                    h,
                    Some((img.picture, k as u32)),
                );
            }
        }
    }
    if spec.other_masks {
        write_mask(&dir.join("masks/others/unrelated.png"), 10, 10, None);
    }
    dir
}

/// Whether pixel (x, y) of a `w`x`h` picture number `k` belongs to its object.
fn in_object(picture: Picture, k: u32, w: u32, h: u32, x: u32, y: u32) -> bool {
    match picture {
        Picture::Disc(_) => {
            let r = (w.min(h) * 5 / 16) as i64;
            let (cx, cy) = ((w / 2 + k) as i64, (h / 2) as i64);
            (x as i64 - cx).pow(2) + (y as i64 - cy).pow(2) < r * r
        }
        Picture::RedBlue => x < w / 2,
    }
}

fn pixel(picture: Picture, k: u32, w: u32, h: u32, x: u32, y: u32) -> [u8; 3] {
    let inside = in_object(picture, k, w, h, x, y);
    match picture {
        Picture::Disc(c) if inside => c,
        Picture::Disc(_) => [90, 140, 200],
        Picture::RedBlue if inside => [255, 0, 0],
        Picture::RedBlue => [0, 0, 255],
    }
}

/// Writes picture number `k` (from 1) at `size` in `format`.
pub fn write_image(path: &Path, size: (u32, u32), format: Format, picture: Picture, k: u32) {
    let (w, h) = size;
    let rgb = ImageBuffer::from_fn(w, h, |x, y| Rgb(pixel(picture, k, w, h, x, y)));
    match format {
        Format::Png | Format::Jpeg | Format::WebP => rgb.save(path).unwrap(),
        Format::Png16Rgba => ImageBuffer::from_fn(w, h, |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0.map(|v| v as u16 * 257);
            Rgba([r, g, b, 30000u16])
        })
        .save(path)
        .unwrap(),
        Format::JpegRotated => std::fs::write(path, exif_rotated_jpeg(rgb)).unwrap(),
    }
}

/// A `w`x`h` mask, white where picture number `k` has its object; all black for `None`.
pub fn write_mask(path: &Path, w: u32, h: u32, object: Option<(Picture, u32)>) {
    ImageBuffer::from_fn(w, h, |x, y| {
        let white = object.is_some_and(|(p, k)| in_object(p, k, w, h, x, y));
        Luma([if white { 255u8 } else { 0 }])
    })
    .save(path)
    .unwrap();
}

/// The JPEG of `img` with an EXIF APP1 segment saying orientation 6.
fn exif_rotated_jpeg(img: image::RgbImage) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let mut tiff = b"II*\0\x08\0\0\0\x01\0".to_vec(); // little endian, IFD at 8, one entry
    tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]); // Orientation (0x0112), SHORT, 1, value 6
    tiff.extend([0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(len.to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

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
