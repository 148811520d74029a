//! Frozen 2D convolution and nearest 2x upsampling. Backward returns only dL/dx (the
//! kernel is frozen), as a convolution of the output gradient with the flipped kernel
//! rather than candle's naive CPU `conv_transpose2d`. And the convolution whose kernel
//! and bias train too (full fine-tuning), with the same dL/dx.

use std::sync::Mutex;

use candle_core::{CustomOp3, Result, Shape, Tensor};

use super::{attach1, fused1, on_cpu_f32, to_vec_f32, with_f32, Grad1};
use crate::kernels::cpu;
use crate::profile::Kind;

// Frozen convolution (optionally after 2x nearest upsampling).

#[derive(Clone)]
struct ConvGrad {
    w: Tensor,
    b: Tensor,
    stride: usize,
    padding: usize,
}

impl Grad1 for ConvGrad {
    const NAME: &'static str = "frozen-conv2d";
    const BWD: Kind = Kind::ConvBwd;
    fn cpu_value(&self, x: &[f32], dims: &[usize]) -> Option<Result<(Vec<f32>, Shape)>> {
        let &[b, _, h, w] = dims else {
            return Some(Err(candle_core::Error::Msg(
                "conv2d expects [b, c, h, w]".into(),
            )));
        };
        let (co, k) = (self.w.dims()[0], self.w.dims()[2]);
        let shape = cpu::ConvShape {
            channels: self.w.dims()[1],
            h,
            w,
            k,
            stride: self.stride,
            padding: self.padding,
        };
        let (oh, ow) = shape.out_hw();
        Some((|| {
            let bias = to_vec_f32(&self.b)?;
            let y = with_f32(&[&self.w], |wt| {
                cpu::conv2d(x, wt[0], Some(&bias), co, &shape)
            })?;
            Ok((y, Shape::from((b, co, oh, ow))))
        })())
    }
    /// dL/dx of a cross-correlation is the full correlation of the (stride-dilated)
    /// output gradient with the flipped, in/out-swapped kernel.
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = self.w.dims4()?;
        let wt = flip_transpose(&self.w)?;
        let (s, p) = (self.stride, self.padding);
        let g = if s > 1 { dilate(g, s)? } else { g.clone() };
        let (gh, gw) = (g.dim(2)?, g.dim(3)?);
        let (lh, lw) = (kh - 1 - p, kw - 1 - p);
        let (rh, rw) = (h + kh - 1 - lh - gh, w + kw - 1 - lw - gw);
        if lh == rh && lw == rw && lh == lw {
            conv2d_value(&g, &wt, 1, lh)
        } else {
            let g = g.pad_with_zeros(2, lh, rh)?.pad_with_zeros(3, lw, rw)?;
            conv2d_value(&g, &wt, 1, 0)
        }
    }
}

/// The kernel of the input-gradient convolution: in/out channels swapped, taps flipped.
fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (co, ci, kh, kw) = w.dims4()?;
    if on_cpu_f32(w) {
        let wt = with_f32(&[w], |t| cpu::flip_transpose(t[0], co, ci, kh, kw))?;
        return Tensor::from_vec(wt, (ci, co, kh, kw), w.device());
    }
    let wt = w.transpose(0, 1)?.contiguous()?;
    if kh * kw == 1 {
        return Ok(wt);
    }
    flip(&flip(&wt, 2)?, 3)?.contiguous()
}

fn flip(t: &Tensor, dim: usize) -> Result<Tensor> {
    let n = t.dim(dim)? as u32;
    let rev: Vec<u32> = (0..n).rev().collect();
    t.index_select(&Tensor::new(rev, t.device())?, dim)
}

/// Inserts `s - 1` zeros between the spatial entries of `g` (and none after the last).
fn dilate(g: &Tensor, s: usize) -> Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    g.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, c, h * s, w * s))?
        .narrow(2, 0, (h - 1) * s + 1)?
        .narrow(3, 0, (w - 1) * s + 1)
}

/// The most bytes of im2col columns one candle convolution may allocate. candle's CUDA
/// conv2d (and its CPU one, used off f32) materializes `b·oh·ow × c·k·k` columns: 3.6 GB
/// in bf16 for the VAE encoder's first-level 3x3 convs on six 512 px images. A slice of
/// one such image still makes a GEMM large enough to fill a GPU, and the U-Net's convs on
/// 64x64 latents are never sliced.
const COLUMN_BUDGET: usize = 512 << 20;

/// How many of `batch` images, each taking `per_image` bytes, fit in `budget` (at least
/// one).
pub fn images_within(budget: usize, per_image: usize, batch: usize) -> usize {
    (budget / per_image.max(1)).clamp(1, batch.max(1))
}

/// Cross-correlation of `x` with `w` (no bias, no graph). On the CPU in f32 through
/// `cpu::conv2d`, much faster than candle's tiled im2col; elsewhere candle's conv2d over
/// slices of the batch (see [`COLUMN_BUDGET`]).
fn conv2d_value(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let x = x.detach();
    if !on_cpu_f32(&x) {
        return conv2d_sliced(&x, w, stride, padding, COLUMN_BUDGET);
    }
    let (b, _, h, wd) = x.dims4()?;
    let (co, _, k, _) = w.dims4()?;
    let shape = cpu::ConvShape {
        channels: w.dim(1)?,
        h,
        w: wd,
        k,
        stride,
        padding,
    };
    let (oh, ow) = shape.out_hw();
    let y = with_f32(&[&x, w], |t| cpu::conv2d(t[0], t[1], None, co, &shape))?;
    Tensor::from_vec(y, (b, co, oh, ow), x.device())
}

/// candle's conv2d over as many images at a time as keep its im2col columns within
/// `budget` bytes (at least one image). Each image's output depends on that image alone.
fn conv2d_sliced(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    budget: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let (oh, ow) = cpu::ConvShape {
        channels: c,
        h,
        w: wd,
        k,
        stride,
        padding,
    }
    .out_hw();
    let per_image = oh * ow * c * k * k * x.dtype().size_in_bytes();
    let chunk = images_within(budget, per_image, b);
    if chunk >= b {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let parts = (0..b)
        .step_by(chunk)
        .map(|i| {
            x.narrow(0, i, chunk.min(b - i))?
                .conv2d(w, padding, stride, 1, 1)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A 2D convolution with a frozen kernel `w` and bias `b`: only dL/dx flows back.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _p = crate::profile::scope(Kind::ConvFwd, x.device());
    let op = ConvGrad {
        w: w.clone(),
        b: b.clone(),
        stride,
        padding,
    };
    fused1(x, op, |x| {
        conv2d_value(x, w, stride, padding)?.broadcast_add(&b.reshape((1, (), 1, 1))?)
    })
}

// Convolution with a trained kernel and bias: candle's own `Conv2D` backward would
// compute dL/dx by its naive CPU `conv_transpose2d`; this one takes `ConvGrad`'s.

struct TrainedConv {
    value: Mutex<Option<Tensor>>,
    stride: usize,
    padding: usize,
}

impl CustomOp3 for TrainedConv {
    fn name(&self) -> &'static str {
        "trained-conv2d"
    }
    precomputed_fwd!(_a _al, _b _bl, _c _cl);
    /// Each gradient only for an input that tracks one.
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope(Kind::ConvBwd, x.device());
        let (s, p, g) = (self.stride, self.padding, g.detach());
        let dx = match x.track_op() {
            true => {
                let frozen = ConvGrad {
                    w: w.detach(),
                    b: b.detach(),
                    stride: s,
                    padding: p,
                };
                Some(frozen.grad(&x.detach(), y, &g)?)
            }
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(kernel_grad(&x.detach(), &g, w.dim(2)?, s, p)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(g.sum((0, 2, 3))?),
            false => None,
        };
        Ok((dx, dw, db))
    }
}

/// dL/dW `[co, ci, k, k]` of a convolution of `x [b, ci, h, w]` with output gradient
/// `g [b, co, oh, ow]`: per tap, `g` times the input window that tap read, summed over
/// images and positions, one GEMM `[co, n] @ [n, ci]` (n = b·oh·ow) per tap.
fn kernel_grad(x: &Tensor, g: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, ci, h, w) = x.dims4()?;
    let (_, co, oh, ow) = g.dims4()?;
    if on_cpu_f32(x) && on_cpu_f32(g) {
        let shape = cpu::ConvShape {
            channels: ci,
            h,
            w,
            k,
            stride,
            padding,
        };
        let dw = with_f32(&[x, g], |t| cpu::conv2d_kernel_grad(t[0], t[1], co, &shape))?;
        return Tensor::from_vec(dw, (co, ci, k, k), x.device());
    }
    let n = b * oh * ow;
    let g = g.to_dtype(x.dtype())?.transpose(0, 1)?.reshape((co, n))?;
    // Zeros past the padding so every tap's window of `stride * out` rows fits.
    let (bottom, right) = (
        (k - 1 + stride * oh).saturating_sub(h + padding),
        (k - 1 + stride * ow).saturating_sub(w + padding),
    );
    let xp = x
        .pad_with_zeros(2, padding, bottom)?
        .pad_with_zeros(3, padding, right)?;
    let mut taps = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            let mut win = xp.narrow(2, ky, stride * oh)?.narrow(3, kx, stride * ow)?;
            if stride > 1 {
                win = (win.reshape((b, ci, oh, stride, ow, stride))?)
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?;
            }
            let win = win.transpose(0, 1)?.reshape((ci, n))?;
            taps.push(g.matmul(&win.t()?)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((co, ci, k, k))
}

/// A 2D convolution whose kernel `w` and bias `b` get gradients (where they track), as
/// well as `x`.
pub fn trained_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _p = crate::profile::scope(Kind::ConvFwd, x.device());
    let (w, b) = (w.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
    let value = conv2d_value(x, &w.detach(), stride, padding)?
        .broadcast_add(&b.detach().reshape((1, (), 1, 1))?)?;
    if !(x.track_op() || w.track_op() || b.track_op()) {
        return Ok(value);
    }
    let op = TrainedConv {
        value: Mutex::new(Some(value)),
        stride,
        padding,
    };
    x.apply_op3(&w, &b, op)
}

#[derive(Clone)]
struct Upsample2xGrad;

impl Grad1 for Upsample2xGrad {
    const NAME: &'static str = "upsample-nearest-2x";
    const BWD: Kind = Kind::UpsampleBwd;
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        g.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)
    }
}

/// Nearest-neighbour 2x upsampling whose backward sums 2x2 blocks (candle's runs a
/// grouped convolution, one conv per channel).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(Kind::UpsampleFwd, x.device());
    let (_, _, h, w) = x.dims4()?;
    let y = x.detach().upsample_nearest2d(2 * h, 2 * w)?;
    attach1(x, y, Upsample2xGrad)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{conv2d_sliced, trained_conv2d};

    /// The trained convolution's value and its gradients for x, kernel and bias equal
    /// candle's own `conv2d` + bias and its backward: 3x3 "same", strided (even, odd and
    /// non-square inputs) and 1x1, in f64 and f32.
    #[test]
    fn trained_conv_matches_candles_backward() {
        let dev = Device::Cpu;
        let cases = [
            // (b, ci, co, h, w, k, stride, padding)
            (2, 3, 4, 8, 8, 3, 1, 1),
            (1, 2, 3, 7, 5, 3, 1, 1),
            (2, 3, 3, 8, 8, 3, 2, 1),
            (1, 2, 2, 7, 7, 3, 2, 1),
            (2, 3, 4, 8, 6, 3, 2, 1),
            (2, 5, 3, 6, 6, 1, 1, 0),
        ];
        for dtype in [DType::F64, DType::F32] {
            for (i, &(b, ci, co, h, w, k, s, p)) in cases.iter().enumerate() {
                let t = |seed: u64, dims: &[usize]| {
                    let t = crate::rng::seeded_normal(seed, dims, &dev).unwrap();
                    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                };
                let (x, wt, bias) = (t(1, &[b, ci, h, w]), t(2, &[co, ci, k, k]), t(3, &[co]));
                let ours = trained_conv2d(&x, &wt, &bias, s, p).unwrap();
                let theirs = (x.conv2d(&wt, p, s, 1, 1).unwrap())
                    .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                    .unwrap();
                let probe = t(4, ours.dims());
                let loss = |y: &Tensor| (y * probe.as_tensor()).unwrap().sum_all().unwrap();
                let (g1, g2) = (
                    loss(&ours).backward().unwrap(),
                    loss(&theirs).backward().unwrap(),
                );
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                let close = |a: &Tensor, b: &Tensor, what: &str| {
                    let d = crate::testkit::tolerance::rel_err_f64(a, b);
                    assert!(d <= tol, "case {i} {dtype:?} {what}: relative error {d}");
                };
                close(&ours, &theirs, "value");
                for (v, what) in [(&x, "dx"), (&wt, "dw"), (&bias, "db")] {
                    let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert_eq!(a.dims(), b.dims(), "case {i} {what}");
                    close(a, b, what);
                }
            }
        }
    }

    /// Slices of the batch give the whole batch's output bit for bit, including a short
    /// last slice, for the 3x3 "same" and the strided unpadded convs.
    #[test]
    fn sliced_conv_is_the_whole_batch_conv() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (5, 3, 9, 9), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (4, 3, 3, 3), &dev).unwrap();
        for (stride, padding) in [(1, 1), (2, 0)] {
            let whole = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            let out = (9 + 2 * padding - 3) / stride + 1;
            let per_image = out * out * 3 * 9 * DType::F64.size_in_bytes();
            for images in [1, 2, 4, 5, 9] {
                let sliced = conv2d_sliced(&x, &w, stride, padding, images * per_image).unwrap();
                let diff = (&sliced - &whole)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert_eq!(sliced.dims(), whole.dims());
                assert_eq!(
                    diff.to_scalar::<f64>().unwrap(),
                    0.0,
                    "s{stride} {images} images"
                );
            }
        }
    }
}
