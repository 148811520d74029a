//! Models only tests (and the masks bench) make: a random-weight MobileSAM. The tiny
//! Stable Diffusion models are product features (`model::tiny`, `--model tiny-random`).

use std::path::Path;

use crate::error::Result;
use crate::io::tensors;
use crate::model::tiny::random_weights;

/// Writes a random-weight MobileSAM (SAM with the TinyViT encoder) in candle's layout,
/// as `lmz/candle-sam`'s `mobile_sam-tiny-vitt.safetensors`, for tests of `--refine sam`.
pub fn write_sam(file: &Path, seed: u64) -> Result<()> {
    let weights = random_weights(seed, |vb| {
        candle_transformers::models::segment_anything::sam::Sam::new_tiny(vb.clone()).map(|_| ())
    })?;
    tensors::write(file, &weights, None)
}
