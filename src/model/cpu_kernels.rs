//! f32 CPU kernels for the elementwise parts of `ops` that candle runs as many separate
//! passes (each a fresh allocation) with scalar libm `exp`/`erf`: row softmax and its
//! gradient, GroupNorm(+SiLU) forward and backward, GEGLU forward and backward, and the
//! im2col gather of a convolution. Rows are split over rayon's threads; the loops are
//! written so LLVM vectorizes them, and compiled a second time for AVX2+FMA, picked at
//! run time.

use rayon::prelude::*;

/// Runs `$body` compiled for AVX2+FMA when the CPU has them, else for the baseline.
macro_rules! dispatch {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// exp(x) to ~2e-7 relative error: 2^n * e^r with |r| <= ln2/2 and a degree-6 series.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(((n as i32 + 127) << 23) as u32) * p
}

/// erf(x) to 1.5e-7 absolute error (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Chunk of rows per rayon task: large enough to amortize scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------
// Softmax over rows of length m.

/// In place: each row of `s` becomes softmax(row); returns each row's log-sum-exp.
pub fn softmax_rows(s: &mut [f32], m: usize) -> Vec<f32> {
    let mut lse = vec![0f32; s.len() / m];
    let per = rows_per_task(m);
    s.par_chunks_mut(m * per)
        .zip(lse.par_chunks_mut(per))
        .for_each(|(rows, lse)| {
            dispatch!(for (row, l) in rows.chunks_mut(m).zip(lse.iter_mut()) {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = exp(*v - max);
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
                *l = max + sum.ln();
            })
        });
    lse
}

/// From scores `s` and dL/dP `dp` (rows of length m), writes P = exp(s - lse) into the
/// first half of the result and dL/dS = P (dP - delta) into the second.
pub fn softmax_grad_rows(s: &[f32], dp: &[f32], lse: &[f32], delta: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; 2 * s.len()];
    let (p_out, ds_out) = out.split_at_mut(s.len());
    let per = rows_per_task(m);
    p_out
        .par_chunks_mut(m * per)
        .zip(ds_out.par_chunks_mut(m * per))
        .zip(s.par_chunks(m * per).zip(dp.par_chunks(m * per)))
        .zip(lse.par_chunks(per).zip(delta.par_chunks(per)))
        .for_each(|(((p_out, ds_out), (s, dp)), (lse, delta))| {
            dispatch!(for (row, (l, d)) in lse.iter().zip(delta).enumerate() {
                let r = row * m..(row + 1) * m;
                for (((po, dso), &sv), &dpv) in p_out[r.clone()]
                    .iter_mut()
                    .zip(&mut ds_out[r.clone()])
                    .zip(&s[r.clone()])
                    .zip(&dp[r])
                {
                    let p = exp(sv - l);
                    *po = p;
                    *dso = p * (dpv - d);
                }
            })
        });
    out
}

// ---------------------------------------------------------------------------------------
// GroupNorm (+ SiLU) over x: [b, c, hw] with `groups` groups of c/groups channels.

pub struct GroupNormShape {
    pub channels: usize,
    pub hw: usize,
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

impl GroupNormShape {
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.hw
    }
}

/// (mean, rstd) of one group, two passes for accuracy.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

pub fn group_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], s: &GroupNormShape) -> Vec<f32> {
    let gl = s.group_len();
    let cpg = s.channels / s.groups;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(gl)
        .zip(x.par_chunks(gl))
        .enumerate()
        .for_each(|(gi, (y, x))| {
            dispatch!({
                let (mean, rstd) = moments(x, s.eps);
                let c0 = (gi % s.groups) * cpg;
                for (k, (y, x)) in y.chunks_mut(s.hw).zip(x.chunks(s.hw)).enumerate() {
                    let (a, b) = (
                        gamma[c0 + k] * rstd,
                        beta[c0 + k] - gamma[c0 + k] * rstd * mean,
                    );
                    for (yv, &xv) in y.iter_mut().zip(x) {
                        let z = xv * a + b;
                        *yv = if s.silu { z * sigmoid(z) } else { z };
                    }
                }
            })
        });
    y
}

/// dL/dx of `group_norm_fwd` given dL/dy, statistics recomputed from `x`.
pub fn group_norm_bwd(
    x: &[f32],
    g: &[f32],
    gamma: &[f32],
    beta: &[f32],
    s: &GroupNormShape,
) -> Vec<f32> {
    let gl = s.group_len();
    let cpg = s.channels / s.groups;
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(gl)
        .zip(x.par_chunks(gl).zip(g.par_chunks(gl)))
        .enumerate()
        .for_each(|(gi, (dx, (x, g)))| {
            dispatch!({
                let (mean, rstd) = moments(x, s.eps);
                let c0 = (gi % s.groups) * cpg;
                // First pass: dxhat into dx, and the two group means it needs.
                let (mut m1, mut m2) = (0f32, 0f32);
                for (k, ((dx, x), g)) in dx
                    .chunks_mut(s.hw)
                    .zip(x.chunks(s.hw))
                    .zip(g.chunks(s.hw))
                    .enumerate()
                {
                    let (gm, bt) = (gamma[c0 + k], beta[c0 + k]);
                    for ((d, &xv), &gv) in dx.iter_mut().zip(x).zip(g) {
                        let xhat = (xv - mean) * rstd;
                        let dz = if s.silu {
                            let z = xhat * gm + bt;
                            let sg = sigmoid(z);
                            gv * sg * (1.0 + z * (1.0 - sg))
                        } else {
                            gv
                        };
                        let dxhat = dz * gm;
                        *d = dxhat;
                        m1 += dxhat;
                        m2 += dxhat * xhat;
                    }
                }
                let n = gl as f32;
                let (m1, m2) = (m1 / n, m2 / n);
                for (d, &xv) in dx.iter_mut().zip(x) {
                    let xhat = (xv - mean) * rstd;
                    *d = rstd * (*d - m1 - xhat * m2);
                }
            })
        });
    dx
}

// ---------------------------------------------------------------------------------------
// GEGLU on rows [h | gate] of length 2 * inner.

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

pub fn geglu_fwd(x: &[f32], inner: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len() / 2];
    let per = rows_per_task(2 * inner);
    y.par_chunks_mut(inner * per)
        .zip(x.par_chunks(2 * inner * per))
        .for_each(|(y, x)| {
            dispatch!(for (y, x) in y.chunks_mut(inner).zip(x.chunks(2 * inner)) {
                let (h, gate) = x.split_at(inner);
                for ((yv, &hv), &gv) in y.iter_mut().zip(h).zip(gate) {
                    *yv = hv * 0.5 * gv * (1.0 + erf(gv * FRAC_1_SQRT_2));
                }
            })
        });
    y
}

pub fn geglu_bwd(x: &[f32], g: &[f32], inner: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    let per = rows_per_task(2 * inner);
    dx.par_chunks_mut(2 * inner * per)
        .zip(x.par_chunks(2 * inner * per).zip(g.par_chunks(inner * per)))
        .for_each(|(dx, (x, g))| {
            dispatch!(for ((dx, x), g) in dx
                .chunks_mut(2 * inner)
                .zip(x.chunks(2 * inner))
                .zip(g.chunks(inner))
            {
                let (h, gate) = x.split_at(inner);
                let (dh, dgate) = dx.split_at_mut(inner);
                for i in 0..inner {
                    let gv = gate[i];
                    let cdf = 0.5 * (1.0 + erf(gv * FRAC_1_SQRT_2));
                    let pdf = INV_SQRT_2PI * exp(-0.5 * gv * gv);
                    dh[i] = g[i] * gv * cdf;
                    dgate[i] = g[i] * h[i] * (cdf + gv * pdf);
                }
            })
        });
    dx
}

// ---------------------------------------------------------------------------------------
// im2col for a stride-1 "same"-size or general 2D convolution.

pub struct ConvShape {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }
}

/// Images `[b, c, h, w]` to columns `[b, c * k * k, oh * ow]` (zeros where padded), so
/// the convolution of image i is `W[c_out, c k k] @ cols[i]`.
pub fn im2col(x: &[f32], s: &ConvShape) -> Vec<f32> {
    let (oh, ow) = s.out_hw();
    let (k, p, st) = (s.k, s.padding as isize, s.stride);
    let images_x_channels = x.len() / (s.h * s.w);
    let mut cols = vec![0f32; images_x_channels * k * k * oh * ow];
    cols.par_chunks_mut(k * k * oh * ow)
        .zip(x.par_chunks(s.h * s.w))
        .for_each(|(cols, img)| {
            for ky in 0..k {
                for kx in 0..k {
                    let dst = &mut cols[(ky * k + kx) * oh * ow..][..oh * ow];
                    for oy in 0..oh {
                        let iy = (oy * st) as isize + ky as isize - p;
                        if iy < 0 || iy >= s.h as isize {
                            continue;
                        }
                        let src = &img[iy as usize * s.w..][..s.w];
                        let row = &mut dst[oy * ow..][..ow];
                        for (ox, v) in row.iter_mut().enumerate() {
                            let ix = (ox * st) as isize + kx as isize - p;
                            if ix >= 0 && ix < s.w as isize {
                                *v = src[ix as usize];
                            }
                        }
                    }
                }
            }
        });
    cols
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst = (0f32, 0f32);
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let e = ((super::exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs() as f32;
            let r = (super::erf(x) as f64 - libm_erf(x as f64)).abs() as f32;
            worst = (worst.0.max(e), worst.1.max(r));
        }
        assert!(
            worst.0 < 5e-7 && worst.1 < 5e-7,
            "exp rel {} erf abs {}",
            worst.0,
            worst.1
        );
    }

    /// erf in f64 through its series (enough terms for |x| <= 80 is not needed: erf
    /// saturates to +-1 within f32 rounding past |x| = 4).
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
