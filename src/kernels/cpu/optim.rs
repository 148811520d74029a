//! The optimizer's per-element math in one pass over each tensor (candle's ops make a
//! dozen single-threaded passes, each a fresh allocation: 15% of a full fine-tune's CPU
//! step). Chunks are split over rayon's threads; every sum is taken per fixed-size chunk,
//! then over the chunks in order, so the result does not depend on the thread count.

use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// AdamW's per-step scalars, each cast from f64 to f32 as candle casts a scalar operand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// The clipped tensors' gradient scale.
    pub coef: f32,
    pub b1: f32,
    pub omb1: f32,
    pub b2: f32,
    pub omb2: f32,
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    pub lr: f32,
}

/// `x * mul + add`, rounded twice as candle's `affine` (no fused multiply-add).
#[inline(always)]
fn affine(x: f32, mul: f32, add: f32) -> f32 {
    x * mul + add
}

/// One AdamW step, the gradient scaled by `s.coef` where `clipped`: the new parameter and
/// moments, rounded exactly as the composed ops (`multi_tensor::adamw_composed`) and the
/// CUDA kernel (`adamw.cu`).
pub fn adamw(
    (p, g, m, v): (&[f32], &[f32], &[f32], &[f32]),
    s: &AdamWScalars,
    clipped: bool,
) -> [Vec<f32>; 3] {
    let n = p.len();
    let (mut po, mut mo, mut vo) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    (po.par_chunks_mut(CHUNK).zip(mo.par_chunks_mut(CHUNK)))
        .zip(vo.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((po, mo), vo))| {
            let at = c * CHUNK;
            dispatch!(adamw_chunk(
                &p[at..at + po.len()],
                &g[at..at + po.len()],
                &m[at..at + po.len()],
                &v[at..at + po.len()],
                (s, clipped),
                [po, mo, vo]
            ))
        });
    [po, mo, vo]
}

#[inline(always)]
fn adamw_chunk(
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    (s, clipped): (&AdamWScalars, bool),
    out: [&mut [f32]; 3],
) {
    let [po, mo, vo] = out;
    for i in 0..p.len() {
        let gi = match clipped {
            true => affine(g[i], s.coef, 0.0),
            false => g[i],
        };
        let mi = affine(m[i], s.b1, 0.0) + affine(gi, s.omb1, 0.0);
        let vi = affine(v[i], s.b2, 0.0) + affine(gi * gi, s.omb2, 0.0);
        let denom = affine(affine(vi, s.inv_bc2, 0.0).sqrt(), 1.0, s.eps);
        let update = affine(mi, s.inv_bc1, 0.0) / denom;
        po[i] = affine(p[i], s.decay, 0.0) - affine(update, s.lr, 0.0);
        mo[i] = mi;
        vo[i] = vi;
    }
}

/// The sum of squares of `x` in f64.
pub fn sq_sum(x: &[f32]) -> f64 {
    let parts: Vec<f64> = (x.par_chunks(CHUNK))
        .map(|c| c.iter().map(|&a| f64::from(a) * f64::from(a)).sum())
        .collect();
    parts.into_iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sum does not depend on how rayon splits the work.
    #[test]
    fn sq_sum_is_the_same_on_any_number_of_threads() {
        let x: Vec<f32> = (0..100_003)
            .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let want = one.install(|| sq_sum(&x));
        assert_eq!(sq_sum(&x).to_bits(), want.to_bits());
        let plain: f64 = x.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
        assert!((want - plain).abs() <= 1e-9 * plain);
    }
}
