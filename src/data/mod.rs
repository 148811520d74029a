//! Pair folders in the published MagicTailor layout:
//!
//! ```text
//! person_k+hair_c/            {class}_{id} per sample, joined by '+'
//!   0_person_k1.jpg ...       leading number = sample (0 = concept, 1.. = components)
//!   1_hair_c1.jpg ...
//!   masks/0_person_k1.png     white = wanted region (masks/others/ is ignored)
//! ```
//!
//! May import only `error`.

mod images;
pub mod synthetic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, IoOp, Result};
pub use images::{
    crop_square, image_size, load_mask, load_rgb, load_rgb_sized, mask_tensor, rgb_image,
    rgb_tensor,
};

const IMAGE_EXTS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// What to do when a folder has no mask for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskPolicy {
    /// Every image needs `masks/{stem}.png|jpg`; `model` is the base model whose
    /// attention would make missing ones (for the message that says how).
    Required { model: String },
    /// `--no-masks`: the whole image is the wanted region.
    WholeImage,
}

/// One reference image at training resolution.
#[derive(Debug, Clone)]
pub struct RefImage {
    pub path: PathBuf,
    /// `[3, R, R]` in [-1, 1].
    pub pixels: Tensor,
    /// `[1, R, R]`, 1 inside the wanted region, 0 outside.
    pub mask: Tensor,
}

/// A concept or component: its class word and reference images.
#[derive(Debug, Clone)]
pub struct Sample {
    pub index: usize,
    pub class_word: String,
    pub images: Vec<RefImage>,
}

#[derive(Debug, Clone)]
pub struct PairDataset {
    pub dir: PathBuf,
    pub resolution: usize,
    pub samples: Vec<Sample>,
}

impl PairDataset {
    pub fn load(dir: &Path, resolution: usize, masks: MaskPolicy, device: &Device) -> Result<Self> {
        let class_words = class_words(dir)?;
        let files = image_files(dir)?;
        let by_sample = group_by_sample(&files, &class_words, dir)?;
        let mask_files = mask_files(dir)?;
        check_masks_have_images(&mask_files, &files)?;
        let mut samples = Vec::with_capacity(class_words.len());
        for (index, class_word) in class_words.into_iter().enumerate() {
            let mut images = Vec::new();
            for path in by_sample.get(&index).into_iter().flatten() {
                let pixels = load_rgb(path, resolution, device)?;
                let stem = stem(path);
                let mask = match (mask_files.get(&stem), &masks) {
                    (Some(m), _) => load_mask(m, resolution, device)?,
                    (None, MaskPolicy::WholeImage) => {
                        Tensor::ones((1, resolution, resolution), candle_core::DType::F32, device)?
                    }
                    (None, MaskPolicy::Required { model }) => {
                        return Err(missing_masks(dir, &files, &mask_files, model))
                    }
                };
                images.push(RefImage {
                    path: path.clone(),
                    pixels,
                    mask,
                });
            }
            samples.push(Sample {
                index,
                class_word,
                images,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            resolution,
            samples,
        })
    }

    /// All images in sample order, with the sample index of each.
    pub fn images(&self) -> impl Iterator<Item = (usize, &RefImage)> {
        self.samples
            .iter()
            .flat_map(|s| s.images.iter().map(move |im| (s.index, im)))
    }

    /// Replaces every image's mask with a computed one (keyed by image stem), through the
    /// same resize and threshold as mask files.
    pub fn set_masks(&mut self, masks: &BTreeMap<String, image::DynamicImage>) -> Result<()> {
        let (res, masks_dir) = (self.resolution, self.dir.join("masks"));
        for s in &mut self.samples {
            for im in &mut s.images {
                let stem = stem(&im.path);
                let mask = masks.get(&stem).ok_or_else(|| {
                    Error::internal(format!("no computed mask for {}", im.path.display()))
                })?;
                let device = im.pixels.device().clone();
                im.mask = mask_tensor(mask, res, &device, &masks_dir.join(format!("{stem}.png")))?;
            }
        }
        Ok(())
    }

    pub fn num_images(&self) -> usize {
        self.samples.iter().map(|s| s.images.len()).sum()
    }
}

/// A file's name without its extension: how images and their masks are paired.
pub(crate) fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `person_k+hair_c` -> ["person", "hair"]; the trailing `_{id}` is dropped and any other
/// underscore becomes a space (`teddy_bear_a` -> "teddy bear").
/// The names of the pair folders (`a_x+b_y`) directly in `dir`, sorted.
fn pair_folders_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = (entries.flatten())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('+') && !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

pub fn class_words(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Err(Error::usage(format!(
            "the instance folder {} does not exist or is not a folder.",
            dir.display()
        )));
    }
    let name = folder_name(dir);
    if !name.contains('+') {
        let pairs = pair_folders_in(dir);
        if !pairs.is_empty() {
            return Err(Error::usage(format!(
                "{} is not a pair folder but holds {} of them ({}{}): train them all with \
                 `magictailor batch --pairs {} --output-root DIR`, or pass one of them.",
                dir.display(),
                pairs.len(),
                pairs[..pairs.len().min(3)].join(", "),
                if pairs.len() > 3 { ", ..." } else { "" },
                dir.display()
            )));
        }
        // A folder of one sample (ViCo's and DreamBench's layout: `dog_a/0_*.jpg`).
        let files = image_files(dir)?;
        if !files.is_empty() && files.iter().all(|f| sample_index(f) == Some(0)) {
            return Ok(vec![sample_word(&name)?]);
        }
        return Err(Error::usage(format!(
            "the folder name {name:?} ({}) does not name its samples: MagicTailor pair folders are named \
             {{concept}}_{{id}}+{{component}}_{{id}}, e.g. person_k+hair_c (a folder of one sample, \
             e.g. dog_a, holds only images named 0_*). Rename the folder.",
            dir.display()
        )));
    }
    name.split('+').map(sample_word).collect()
}

/// The class word of one part of a folder name: `teddy_bear_a` -> "teddy bear".
fn sample_word(part: &str) -> Result<String> {
    let word = match part.rsplit_once('_') {
        Some((w, _id)) if !w.is_empty() => w,
        _ => part,
    };
    let word = word.replace('_', " ").trim().to_string();
    if word.is_empty() {
        return Err(Error::usage(format!(
            "the folder name part {part:?} has an empty sample name."
        )));
    }
    Ok(word)
}

/// The first image of each sample of the folder `dir` (its reference by default, ViCo).
pub fn first_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let words = class_words(dir)?;
    let by_sample = group_by_sample(&image_files(dir)?, &words, dir)?;
    Ok(by_sample
        .into_values()
        .filter_map(|v| v.into_iter().next())
        .collect())
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// The image files directly in `dir`, sorted.
pub(crate) fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(IoOp::List, dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    files.sort();
    Ok(files)
}

/// The sample index is the number before the first `_` of the file name.
fn sample_index(path: &Path) -> Option<usize> {
    stem(path).split('_').next()?.parse().ok()
}

fn group_by_sample(
    files: &[PathBuf],
    class_words: &[String],
    dir: &Path,
) -> Result<BTreeMap<usize, Vec<PathBuf>>> {
    let mut by_sample: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        let idx = sample_index(f).ok_or_else(|| {
            Error::usage(format!(
                "{} does not start with a sample number: name reference images {{n}}_..., where n is 0 for \
                 the concept and 1, 2, ... for the components.",
                f.display()
            ))
        })?;
        if idx >= class_words.len() {
            return Err(Error::usage(format!(
                "{} belongs to sample {idx}, but the folder name {:?} names only {} samples ({}): add a \
                 `+{{class}}_{{id}}` part to the folder name or renumber the file.",
                f.display(),
                folder_name(dir),
                class_words.len(),
                class_words.join(", ")
            )));
        }
        by_sample.entry(idx).or_default().push(f.clone());
    }
    for (i, word) in class_words.iter().enumerate() {
        if !by_sample.contains_key(&i) {
            return Err(Error::usage(format!(
                "sample {i} ({word}) has no images in {}: add reference images named {i}_*.jpg or {i}_*.png.",
                dir.display()
            )));
        }
    }
    Ok(by_sample)
}

/// The preview sheet's name in a masks folder (`masks/preview.png`), never a mask.
pub const PREVIEW_STEM: &str = "preview";

/// `masks/{stem}.png|jpg`, keyed by stem; `masks/others/` is not read.
fn mask_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let masks = dir.join("masks");
    if !masks.is_dir() {
        return Ok(BTreeMap::new());
    }
    let mut out = BTreeMap::new();
    // `magictailor masks` writes its preview sheet beside the masks.
    for p in image_files(&masks)?
        .into_iter()
        .filter(|p| stem(p) != PREVIEW_STEM)
    {
        out.insert(stem(&p), p);
    }
    Ok(out)
}

fn check_masks_have_images(masks: &BTreeMap<String, PathBuf>, images: &[PathBuf]) -> Result<()> {
    for (s, m) in masks {
        if !images.iter().any(|i| &stem(i) == s) {
            return Err(Error::usage(format!(
                "the mask {} has no reference image named {s}.jpg/.png beside masks/: rename or remove it.",
                m.display()
            )));
        }
    }
    Ok(())
}

fn missing_masks(
    dir: &Path,
    images: &[PathBuf],
    masks: &BTreeMap<String, PathBuf>,
    model: &str,
) -> Error {
    let missing: Vec<String> = images
        .iter()
        .map(|p| stem(p))
        .filter(|s| !masks.contains_key(s))
        .collect();
    let why = if masks.is_empty() {
        format!(
            "{} has no masks: run `magictailor masks --instance-dir {}` to make them from the base \
             model's attention, or draw masks/{{image stem}}.png (white = the wanted region)",
            dir.display(),
            dir.display()
        )
    } else {
        format!(
            "{} has masks for some images but not for {}: add masks/{}.png (white = the wanted \
             region), or make just the missing ones (the others are kept) with `magictailor masks \
             --instance-dir {} --missing --model {model}`",
            dir.display(),
            missing.join(", "),
            missing[0],
            dir.display()
        )
    };
    Error::usage(format!(
        "{why}. MagicTailor needs a mask per reference image; pass --no-masks to use whole images instead \
         (this lets background and other objects leak into the learned words)."
    ))
}

/// True when `dir/masks/` holds at least one mask.
pub fn has_masks(dir: &Path) -> Result<bool> {
    Ok(!mask_files(dir)?.is_empty())
}
