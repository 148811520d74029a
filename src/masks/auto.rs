//! `train` on a pair folder without `masks/`: the masks are made with `magictailor
//! masks`' code and defaults, applied through the same resize and threshold as mask
//! files, and written (with the preview) into the run's output folder once it is claimed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};

use super::{compute, full_size, preview, AttentionOptions, MaskRecord};
use crate::data::{self, PairDataset};
use crate::error::Result;
use crate::model::loader::StableDiffusion;

/// Masks made for a training run, not yet written.
pub struct AutoMasks {
    pub record: MaskRecord,
    files: Vec<(String, image::GrayImage)>,
    preview: RgbImage,
}

/// True when `train` must make the masks: masks are wanted and the folder has none.
/// (A folder with only some masks stays an error, from the loader.)
pub fn needed(instance_dir: &Path, no_masks: bool) -> Result<bool> {
    Ok(!no_masks && !data::has_masks(instance_dir)?)
}

/// Makes the masks of `data` (loaded with whole-image masks at the training resolution)
/// and puts them in place.
pub fn apply(sd: &StableDiffusion, data: &mut PairDataset, progress: bool) -> Result<AutoMasks> {
    let record = MaskRecord {
        method: "attention".into(),
        model: sd.source.clone(),
        attention: AttentionOptions {
            resolution: data.resolution,
            ..AttentionOptions::default()
        },
        sam_model: None,
    };
    super::check_resolution(sd, data.resolution)?;
    let masks = compute(sd, data, &record, None, progress)?;
    let mut files = Vec::with_capacity(masks.len());
    let mut by_stem = BTreeMap::new();
    for m in &masks {
        let stem = data::stem(&m.image);
        let full = full_size(m)?;
        by_stem.insert(stem.clone(), DynamicImage::ImageLuma8(full.clone()));
        files.push((stem, full));
    }
    let pixels: Vec<_> = data.images().map(|(_, im)| &im.pixels).collect();
    let title = format!("{}: masks made by train", data.dir.display());
    let preview = preview::sheet(&masks, &pixels, &title)?;
    data.set_masks(&by_stem)?;
    Ok(AutoMasks {
        record,
        files,
        preview,
    })
}

impl AutoMasks {
    /// Writes `{out}/masks/` (masks and preview.png); returns the preview's path.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        let dir = out.join("masks");
        super::folder::write(&dir, &self.files, &self.preview)?;
        Ok(dir.join(format!("{}.png", data::PREVIEW_STEM)))
    }
}
