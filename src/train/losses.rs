//! The masked diffusion loss (paper eq. 1) and the cross-attention loss (eq. 2).

use candle_core::{Result, Tensor, D};

/// Nearest-neighbour resize of square `[b, c, h, h]` masks to `side x side`.
pub fn resize_nearest(x: &Tensor, side: usize) -> Result<Tensor> {
    crate::model::nn::resize_nearest(x, side, side)
}

/// Per-image masked diffusion loss `[b]`: the mean over *all* latent elements of
/// `((pred - eps) * M')^2`, masked-out zeros included, as the released script computes
/// eq. 1 (so a sample with a smaller mask has a smaller loss; docs/method.md §14).
pub fn masked_diffusion_per_image(
    pred: &Tensor,
    eps: &Tensor,
    mask_latent: &Tensor,
) -> Result<Tensor> {
    let diff = (pred - eps)?.broadcast_mul(mask_latent)?;
    diff.sqr()?.flatten_from(1)?.mean(1)
}

/// Cross-attention loss: the recorded maps (`[b, queries, tokens]` per layer) are averaged
/// over layers, each image's own pseudo-word column (`token_pos[i]`) is divided by its
/// maximum and compared (MSE) with the image's mask at the maps' resolution
/// (`mask_small: [b, 1, side, side]`).
pub fn attention_loss(maps: &[Tensor], token_pos: &[usize], mask_small: &Tensor) -> Result<Tensor> {
    if maps.is_empty() {
        candle_core::bail!(
            "attention loss: no cross-attention maps were recorded at the mask resolution"
        );
    }
    let mean = (Tensor::stack(maps, 0)?.sum(0)? / maps.len() as f64)?;
    let (b, q, _) = mean.dims3()?;
    if token_pos.len() != b {
        candle_core::bail!(
            "attention loss: {} token positions for {b} images",
            token_pos.len()
        );
    }
    let idx: Vec<u32> = token_pos
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p as u32, q))
        .collect();
    let idx = Tensor::from_vec(idx, (b, q, 1), mean.device())?;
    let own = mean.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?; // [b, q]
    let normalized = own.broadcast_div(&own.max_keepdim(1)?)?;
    let target = mask_small.flatten_from(1)?.to_dtype(normalized.dtype())?;
    if target.dims() != normalized.dims() {
        candle_core::bail!(
            "attention loss: maps have {q} queries but masks {:?}",
            mask_small.dims()
        );
    }
    (normalized - target)?.sqr()?.mean_all()
}

/// Mean of a `[b]` vector over the images whose flag is set.
pub fn masked_mean(per_image: &Tensor, keep: &[bool]) -> Result<Tensor> {
    let n = keep.iter().filter(|&&k| k).count();
    if n == 0 {
        return Tensor::zeros((), per_image.dtype(), per_image.device());
    }
    let w: Vec<f32> = keep
        .iter()
        .map(|&k| if k { 1.0 / n as f32 } else { 0.0 })
        .collect();
    let w = Tensor::from_vec(w, keep.len(), per_image.device())?.to_dtype(per_image.dtype())?;
    (per_image * w)?.sum_all()
}
