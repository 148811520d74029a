//! Finding the concept and the component in a generated image.
//!
//! The paper segments with Grounded-SAM; magictailor will use the cross-attention maps of
//! the pseudo-words (`src/masks/`, plugged in through [`Segmenter`]). Until a segmenter is
//! given, [`WholeImage`] scores whole images, and metrics.json says so
//! (`"generated_segmentation": "none"`).

use std::path::Path;

use image::{GrayImage, Luma, RgbImage};

use crate::error::Result;

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
