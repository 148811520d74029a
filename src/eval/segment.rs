//! Finding the concept and the component in a generated image.
//!
//! The paper segments with Grounded-SAM; we read each class word's cross-attention from
//! the base model, as `magictailor masks` does for references ([`Attention`]).
//! [`WholeImage`] scores whole images instead, and metrics.json says which was used
//! (`generated_segmentation`).

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use image::{DynamicImage, GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};
use crate::masks::{self, AttentionOptions};
use crate::model::loader::{SingleFileOptions, StableDiffusion};
use crate::model::tokenizer::pseudo_word;

/// One generated image and how it was made.
pub struct Generated<'a> {
    pub image: &'a RgbImage,
    pub file: &'a Path,
    /// The prompt it was drawn from, with pseudo-words.
    pub prompt: &'a str,
    pub seed: u64,
}

pub trait Segmenter {
    /// Recorded in metrics.json as `generated_segmentation`.
    fn name(&self) -> &str;

    /// A mask per word (the pseudo-words of the prompt, in order), of the image's size,
    /// white (>= 128) inside; `None`: no segmentation, score the whole image.
    fn segment(&self, image: &Generated, words: &[String]) -> Result<Option<Vec<GrayImage>>>;
}

/// No segmentation: every concept and component is scored on the whole image.
pub struct WholeImage;

impl Segmenter for WholeImage {
    fn name(&self) -> &str {
        "none"
    }

    fn segment(&self, _: &Generated, _: &[String]) -> Result<Option<Vec<GrayImage>>> {
        Ok(None)
    }
}

/// Each pseudo-word's class word, segmented by the base model's cross-attention on the
/// generated image. The model loads on first use, so runs whose images all fail
/// earlier checks never load it.
pub struct Attention {
    model: String,
    single_file: SingleFileOptions,
    /// Pseudo-word -> class word, from the run's magictailor.json.
    classes: BTreeMap<String, String>,
    device: Device,
    dtype: DType,
    sd: OnceCell<StableDiffusion>,
}

impl Attention {
    pub fn new(
        model: &str,
        single_file: SingleFileOptions,
        classes: BTreeMap<String, String>,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Self {
            model: model.to_string(),
            single_file,
            classes,
            device: device.clone(),
            dtype,
            sd: OnceCell::new(),
        }
    }

    fn sd(&self) -> Result<&StableDiffusion> {
        if let Some(sd) = self.sd.get() {
            return Ok(sd);
        }
        let sd =
            StableDiffusion::load_with(&self.model, &self.single_file, &self.device, self.dtype)?;
        Ok(self.sd.get_or_init(|| sd))
    }
}

impl Segmenter for Attention {
    fn name(&self) -> &str {
        "attention"
    }

    fn segment(&self, image: &Generated, words: &[String]) -> Result<Option<Vec<GrayImage>>> {
        if words.is_empty() {
            return Ok(Some(Vec::new())); // nothing named, nothing to cut out
        }
        let classes: Vec<String> = words
            .iter()
            .map(|w| {
                self.classes.get(w).cloned().ok_or_else(|| {
                    Error::usage(format!(
                        "{w} in {:?} is not a pseudo-word of this run",
                        image.prompt
                    ))
                })
            })
            .collect::<Result<_>>()?;
        // The concept (`<v0>`) first, as the mask prompts expect, then back to prompt order.
        let mut order: Vec<usize> = (0..words.len()).collect();
        order.sort_by_key(|&i| words[i] != pseudo_word(0));
        let sorted: Vec<String> = order.iter().map(|&i| classes[i].clone()).collect();
        let sd = self.sd()?;
        let (w, h) = image.image.dimensions();
        let opts = AttentionOptions {
            resolution: (w.min(h) as usize / sd.vae_factor() * sd.vae_factor())
                .max(8 * sd.vae_factor()),
            ..AttentionOptions::default()
        };
        let rgb = DynamicImage::ImageRgb8(image.image.clone());
        let pixels = crate::data::rgb_tensor(&rgb, opts.resolution, &sd.device)?;
        let regions = masks::pair::word_regions(sd, &pixels, &sorted, &opts)?;
        let mut out = vec![GrayImage::new(w, h); words.len()];
        for (k, region) in order.into_iter().zip(regions) {
            out[k] = masks::uncrop(&region, w, h);
        }
        Ok(Some(out))
    }
}

/// `mask` minus every mask of `others` (the concept without its components, as training
/// does). An empty result falls back to `mask` itself, and an empty `mask` to `None` (the
/// whole image); the bool says whether a fallback happened.
pub fn without(mask: &GrayImage, others: &[&GrayImage]) -> (Option<GrayImage>, bool) {
    let out = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        let inside = mask.get_pixel(x, y)[0] >= 128;
        let taken = others.iter().any(|o| o.get_pixel(x, y)[0] >= 128);
        Luma([if inside && !taken { 255 } else { 0 }])
    });
    if !is_empty(&out) {
        (Some(out), false)
    } else if !is_empty(mask) {
        (Some(mask.clone()), true)
    } else {
        (None, true)
    }
}

pub fn is_empty(mask: &GrayImage) -> bool {
    mask.pixels().all(|p| p[0] < 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(left: bool) -> GrayImage {
        GrayImage::from_fn(4, 2, |x, _| Luma([if (x < 2) == left { 255 } else { 0 }]))
    }

    #[test]
    fn the_component_is_removed_from_the_concept() {
        let all = GrayImage::from_pixel(4, 2, Luma([255]));
        let (m, fell_back) = without(&all, &[&half(true)]);
        assert_eq!(m.unwrap(), half(false));
        assert!(!fell_back);
    }

    #[test]
    fn an_emptied_concept_falls_back_to_its_own_mask() {
        let (m, fell_back) = without(&half(true), &[&half(true)]);
        assert_eq!(m.unwrap(), half(true));
        assert!(fell_back);
        let (m, fell_back) = without(&GrayImage::new(4, 2), &[]);
        assert!(m.is_none() && fell_back);
    }
}
