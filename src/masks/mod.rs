//! Masks without Grounded-SAM: `magictailor masks`, and `train` on a pair folder that has
//! none. Each class word's cross-attention map from the base model (`attention.rs`),
//! thresholded with Otsu's method (`otsu.rs`) and cleaned up (`cleanup.rs`); a concept
//! mask leaves out its components (`pair.rs`); optionally refined with Segment Anything
//! (`sam.rs`). Masks are written at each image's own size (`folder.rs`) and read back
//! like a user's, so `train` resizes and binarizes both the same way.
//!
//! May import `data`, `model`, `io`, `preview` and `rng`; `train` and
//! `eval` import it.

pub mod attention;
pub mod auto;
pub mod blend;
pub mod cleanup;
pub mod folder;
pub mod otsu;
pub mod pair;
pub mod preview;
pub mod sam;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::GrayImage;
use serde::{Deserialize, Serialize};

pub use attention::AttentionOptions;
pub use cleanup::{clean, Binary};
pub use otsu::otsu_threshold;
pub use pair::ImageMask;

use crate::data::{self, stem, MaskPolicy, PairDataset};
use crate::error::{Error, Result};
use crate::model::loader::StableDiffusion;

/// A soft map (any range) -> a cleaned binary mask, with Otsu's threshold.
pub fn binarize(map: &[f32], width: usize, height: usize) -> Binary {
    let t = otsu_threshold(map);
    let raw = Binary {
        width,
        height,
        bits: map.iter().map(|&v| v > t).collect(),
    };
    clean(&raw)
}

/// How masks were made; `train` records it in `magictailor.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskRecord {
    /// "attention" or "attention+sam".
    pub method: String,
    /// The Stable Diffusion model whose attention was read.
    pub model: String,
    pub attention: AttentionOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sam_model: Option<String>,
}

/// What `magictailor masks` does.
#[derive(Debug, Clone)]
pub struct MasksOptions {
    pub instance_dir: PathBuf,
    /// Where the masks go; `None`: `{instance_dir}/masks`.
    pub out: Option<PathBuf>,
    pub model: String,
    /// What a single-file `model` needs beside its weights.
    pub single_file: crate::model::loader::SingleFileOptions,
    pub attention: AttentionOptions,
    /// `--refine sam`: the SAM weights (a folder, a file or a hub id).
    pub sam_model: Option<String>,
    pub overwrite: bool,
    /// Make only the masks the target lacks, keeping the others.
    pub missing: bool,
    pub device: Device,
    pub dtype: DType,
    pub progress: bool,
}

/// One written mask, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub class_word: String,
    pub sample: usize,
    /// The share of the training crop the mask covers.
    pub area: f64,
}

/// `magictailor masks`: checks everything, computes every mask, then writes the folder
/// in one change. Returns the masks written and the preview's path.
pub fn make_masks(opts: &MasksOptions) -> Result<(Vec<Written>, PathBuf)> {
    let target = opts
        .out
        .clone()
        .unwrap_or_else(|| opts.instance_dir.join("masks"));
    let data = PairDataset::load(
        &opts.instance_dir,
        opts.attention.resolution,
        MaskPolicy::WholeImage,
        &opts.device,
    )?;
    let stems: Vec<String> = data.images().map(|(_, im)| stem(&im.path)).collect();
    let wanted: Vec<bool> = match opts.missing {
        true => (stems.iter())
            .map(|s| folder::existing(&target, std::slice::from_ref(s)).is_empty())
            .collect(),
        false => {
            refuse_overwrite(&data, &target, opts.overwrite)?;
            vec![true; stems.len()]
        }
    };
    if !wanted.contains(&true) {
        return Ok((
            Vec::new(),
            target.join(format!("{}.png", data::PREVIEW_STEM)),
        ));
    }
    let sd = StableDiffusion::load_with(&opts.model, &opts.single_file, &opts.device, opts.dtype)?;
    check_resolution(&sd, opts.attention.resolution)?;
    check_timesteps(&sd, &opts.attention.timesteps)?;
    let sam = opts
        .sam_model
        .as_deref()
        .map(|m| sam::Refiner::load(m, &opts.device))
        .transpose()?;
    let record = MaskRecord {
        method: if sam.is_some() {
            "attention+sam"
        } else {
            "attention"
        }
        .into(),
        model: opts.model.clone(),
        attention: opts.attention.clone(),
        sam_model: opts.sam_model.clone(),
    };
    // Every image's attention is read (a concept mask leaves out its components'), and
    // only the wanted masks are written.
    let masks = compute(&sd, &data, &record, sam.as_ref(), opts.progress)?;
    for dir in [target.parent(), Some(target.as_path())]
        .into_iter()
        .flatten()
    {
        crate::io::leftovers::remove_orphans(dir, crate::io::leftovers::Scope::Folder);
    }
    let written = write(&target, &data, &masks, &wanted)?;
    Ok((written, target.join(format!("{}.png", data::PREVIEW_STEM))))
}

fn refuse_overwrite(data: &PairDataset, target: &Path, overwrite: bool) -> Result<()> {
    folder::check_target(target)?;
    let stems: Vec<String> = data.images().map(|(_, im)| stem(&im.path)).collect();
    let found = folder::existing(target, &stems);
    if overwrite || found.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    Err(Error::usage(format!(
        "masks already exist: {}. Pass --overwrite to replace them, or --out DIR to write elsewhere.",
        names.join(", ")
    )))
}

/// The resolution must be a whole number of latent cells.
pub fn check_resolution(sd: &StableDiffusion, resolution: usize) -> Result<()> {
    let f = sd.vae_factor();
    crate::model::loader::check_side("--resolution", resolution, f, 8 * f)
}

pub fn check_timesteps(sd: &StableDiffusion, timesteps: &[usize]) -> Result<()> {
    let n = sd.schedule.num_train_timesteps();
    if !timesteps.is_empty() && timesteps.iter().all(|&t| t < n) {
        return Ok(());
    }
    Err(Error::usage(format!(
        "--timesteps {timesteps:?}: give one or more timesteps below {n} (this model's training \
         timesteps), e.g. 200,400,600."
    )))
}

/// Every image's mask: attention, then SAM when given; a progress bar over the images.
pub fn compute(
    sd: &StableDiffusion,
    data: &PairDataset,
    record: &MaskRecord,
    sam: Option<&sam::Refiner>,
    progress: bool,
) -> Result<Vec<ImageMask>> {
    let bar = crate::io::progress::ticker("masks", data.num_images() as u64, 0, 1, progress);
    let mut masks = pair::attention_masks(sd, data, &record.attention, |_| bar.inc(1))?;
    bar.finish();
    if let Some(sam) = sam {
        let pixels: Vec<_> = data.images().map(|(_, im)| &im.pixels).collect();
        for (m, px) in masks.iter_mut().zip(pixels) {
            m.crop = sam.refine(px, m)?;
        }
    }
    Ok(masks)
}

/// Writes the `wanted` ones of `masks` (one per image of `data`) at each image's own
/// size, with their preview, into `target`, keeping its other masks.
pub fn write(
    target: &Path,
    data: &PairDataset,
    masks: &[ImageMask],
    wanted: &[bool],
) -> Result<Vec<Written>> {
    let pixels: Vec<_> = (data.images().zip(wanted))
        .filter(|(_, w)| **w)
        .map(|((_, im), _)| &im.pixels)
        .collect();
    let masks: Vec<ImageMask> = (masks.iter().zip(wanted))
        .filter(|(_, w)| **w)
        .map(|(m, _)| m.clone())
        .collect();
    let mut files = Vec::with_capacity(masks.len());
    for m in &masks {
        files.push((stem(&m.image), full_size(m)?));
    }
    let title = format!("{}: masks", data.dir.display());
    let sheet = preview::sheet(&masks, &pixels, &title)?;
    let paths = folder::write(target, &files, &sheet)?;
    Ok(masks
        .iter()
        .zip(paths)
        .map(|(m, mask)| Written {
            image: m.image.clone(),
            mask,
            class_word: m.class_word.clone(),
            sample: m.sample,
            area: m.crop.area() as f64 / m.crop.bits.len().max(1) as f64,
        })
        .collect())
}

/// The mask at its image's own size: the training crop scaled back into place; the
/// sides `train` crops off stay black, since no step ever sees them.
pub fn full_size(m: &ImageMask) -> Result<GrayImage> {
    let (w, h) = data::image_size(&m.image)?;
    Ok(uncrop(&m.crop, w, h))
}

/// `crop` (a mask of the centred square) placed back into a `w x h` image.
pub fn uncrop(crop: &Binary, w: u32, h: u32) -> GrayImage {
    let (x0, y0, side) = data::crop_square(w, h);
    let res = crop.width;
    GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= x0 && y >= y0 && x < x0 + side && y < y0 + side;
        let on = inside && {
            let cx = ((x - x0) as usize * res / side as usize).min(res - 1);
            let cy = ((y - y0) as usize * res / side as usize).min(res - 1);
            crop.bits[cy * res + cx]
        };
        image::Luma([if on { 255 } else { 0 }])
    })
}
