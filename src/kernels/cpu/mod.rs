//! f32 CPU kernels for the parts of `ops` that candle runs as many separate passes
//! (each a fresh allocation) with scalar libm `exp`/`erf`: flash-style attention forward
//! and backward, GroupNorm(+SiLU) forward and backward, GEGLU forward and backward, the
//! im2col gather of a convolution, and the optimizer's AdamW and gradient norms. Rows are split over rayon's threads; the loops are
//! written so LLVM vectorizes them, and compiled again for AVX2+FMA and AVX-512, picked
//! at run time.
//!
//! Here: the run-time SIMD dispatch, vectorizable exp/erf and reductions, and the raw
//! GEMM wrapper; one file per op holds its kernels (declared after `dispatch!`, which
//! they use).
//!
//! Plain functions on f32 slices: may import std, rayon and gemm only (no candle, nothing
//! else of the crate).

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them, else for the
/// baseline x86-64.
macro_rules! dispatch {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the features were just detected.
                unsafe { avx512(|| $body) }
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
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

/// The code `dispatch!` picks on this CPU, for `magictailor doctor`.
pub(crate) fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "AVX2+FMA";
        }
    }
    "baseline (no AVX2)"
}

/// exp(x) to ~2e-7 relative error: 2^n * e^r with |r| <= ln2/2 and a degree-6 series.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in t's low mantissa bits: read it from there, since `n as i32`
    // (saturating) does not vectorize.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits((ni.wrapping_add(127) << 23) as u32) * p
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

/// Independent accumulators per reduction, so that reductions vectorize (one float
/// accumulator is a dependency chain LLVM may not reorder).
const LANES: usize = 16;

#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = blocks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    acc.iter().fold(tail, |a, &v| a.max(v))
}

/// `sum f(x_i)`, with LANES accumulators.
#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + blocks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// `sum x_i * y_i`, with LANES accumulators.
#[inline(always)]
fn lanes_dot(x: &[f32], y: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut xb, mut yb) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    for (bx, by) in (&mut xb).zip(&mut yb) {
        for ((a, &u), &v) in acc.iter_mut().zip(bx).zip(by) {
            *a += u * f(v);
        }
    }
    let tail: f32 = xb
        .remainder()
        .iter()
        .zip(yb.remainder())
        .map(|(&u, &v)| u * f(v))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Chunk of rows per rayon task: large enough to amortize scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

mod attention;
mod conv;
mod geglu;
mod linear;
mod norm;
mod optim;

pub use attention::{attention_bwd, attention_fwd, AttnShape};
pub use conv::{conv2d, conv2d_kernel_grad, flip_transpose, ConvShape};
pub use geglu::{geglu_bwd, geglu_fwd};
pub use linear::{lora_linear_bwd, lora_linear_fwd, LoraDims};
pub use norm::{group_norm_bwd, group_norm_fwd, layer_norm_bwd, layer_norm_fwd, GroupNormShape};
pub use optim::{adamw, sq_sum, AdamWScalars};

/// `dst[m x n] = acc * dst + beta * lhs[m x k] @ rhs[k x n]` through raw pointers, with
/// (row, column) strides, threaded as `par` says.
///
/// SAFETY: every element addressed by the shapes and strides must be in bounds, and no
/// other thread may access the written elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rc: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_rc: (usize, usize),
    rhs: *const f32,
    rhs_rc: (usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_rc.1 as isize,
            dst_rc.0 as isize,
            accumulate,
            lhs,
            lhs_rc.1 as isize,
            lhs_rc.0 as isize,
            rhs,
            rhs_rc.1 as isize,
            rhs_rc.0 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst (+)= beta * lhs @ rhs`, multi-threaded, for the large products of a linear layer.
#[allow(clippy::too_many_arguments)]
fn mm_par(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rc: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_rc: (usize, usize),
    rhs: &[f32],
    rhs_rc: (usize, usize),
    beta: f32,
) {
    let last = |(r, c): (usize, usize), rows: usize, cols: usize| {
        (rows.max(1) - 1) * r + (cols.max(1) - 1) * c
    };
    assert!(
        last(dst_rc, m, n) < dst.len().max(1)
            && last(lhs_rc, m, k) < lhs.len().max(1)
            && last(rhs_rc, k, n) < rhs.len().max(1),
        "linear gemm out of bounds"
    );
    let (dst, lhs, rhs) = (dst.as_mut_ptr(), lhs.as_ptr(), rhs.as_ptr());
    let par = gemm::Parallelism::Rayon(0);
    // SAFETY: every index touched is inside the slices (asserted above).
    unsafe {
        gemm_raw(
            (m, n, k),
            dst,
            dst_rc,
            accumulate,
            lhs,
            lhs_rc,
            rhs,
            rhs_rc,
            beta,
            par,
        )
    }
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
