//! The released script's augmentation, as tensor ops on the training device: colour
//! jitter (brightness, contrast, saturation, each a factor in [1 - s, 1 + s] per image)
//! and a horizontal flip of the whole batch (image and mask together).

use candle_core::{Result, Tensor};

/// Per-image jitter factors, drawn by the trainer's seeded RNG.
#[derive(Debug, Clone)]
pub struct Jitter {
    pub brightness: Vec<f32>,
    pub contrast: Vec<f32>,
    pub saturation: Vec<f32>,
}

fn per_image(v: &[f32], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v.to_vec(), (v.len(), 1, 1, 1), like.device())?.to_dtype(like.dtype())
}

/// Luma `[b, 1, h, w]` of RGB in [0, 1] (ITU-R 601, as torchvision).
fn gray(x: &Tensor) -> Result<Tensor> {
    let w = Tensor::new(&[0.299f32, 0.587, 0.114], x.device())?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    x.broadcast_mul(&w)?.sum_keepdim(1)
}

/// Pixels in [-1, 1] -> jittered pixels in [-1, 1].
pub fn color_jitter(pixels: &Tensor, j: &Jitter) -> Result<Tensor> {
    let x = ((pixels + 1.0)? / 2.0)?;
    let x = x
        .broadcast_mul(&per_image(&j.brightness, &x)?)?
        .clamp(0f32, 1f32)?;
    let mean = gray(&x)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let x = x
        .broadcast_sub(&mean)?
        .broadcast_mul(&per_image(&j.contrast, &x)?)?
        .broadcast_add(&mean)?
        .clamp(0f32, 1f32)?;
    let g = gray(&x)?;
    let x = x
        .broadcast_sub(&g)?
        .broadcast_mul(&per_image(&j.saturation, &x)?)?
        .broadcast_add(&g)?
        .clamp(0f32, 1f32)?;
    (x * 2.0)? - 1.0
}

/// Mirror `[b, c, h, w]` left-right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    x.index_select(&Tensor::from_vec(idx, w, x.device())?, 3)
}
