//! Masks without a segmentation model (the masks issue): from a soft map (a word's
//! cross-attention, upsampled to the image) to a clean binary mask.
//!
//! This module holds the map-to-mask half: Otsu's threshold, then a clean-up that closes
//! small gaps, keeps the main region(s) and fills holes. Computing the attention maps and
//! the `magictailor masks` command build on it.

pub mod cleanup;
pub mod otsu;

pub use cleanup::{clean, Binary};
pub use otsu::otsu_threshold;

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
