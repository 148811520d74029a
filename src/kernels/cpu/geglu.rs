//! GEGLU forward and backward, with the vectorizable erf (libm's is scalar).

use rayon::prelude::*;

use super::{erf, exp, rows_per_task};

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
