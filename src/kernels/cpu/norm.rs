//! GroupNorm (+ SiLU) and LayerNorm forward and backward, the statistics recomputed in
//! backward rather than stored.

use rayon::prelude::*;

use super::{lanes_dot, lanes_sum, rows_per_task, sigmoid};

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
    let mean = lanes_sum(x, |v| v) / n;
    let var = lanes_sum(x, |v| (v - mean) * (v - mean)) / n;
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
                // dxhat into dx, then the two group means dL/dx needs.
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
                        *d = dz * gm;
                    }
                }
                let n = gl as f32;
                let m1 = lanes_sum(dx, |v| v) / n;
                let m2 = lanes_dot(dx, x, |v| (v - mean) * rstd) / n;
                for (d, &xv) in dx.iter_mut().zip(x) {
                    let xhat = (xv - mean) * rstd;
                    *d = rstd * (*d - m1 - xhat * m2);
                }
            })
        });
    dx
}

// LayerNorm over rows of length n.

pub fn layer_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let n = gamma.len();
    let mut y = vec![0f32; x.len()];
    let per = rows_per_task(n);
    y.par_chunks_mut(n * per)
        .zip(x.par_chunks(n * per))
        .for_each(|(y, x)| {
            dispatch!(for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                let (mean, rstd) = moments(x, eps);
                for (((yv, &xv), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *yv = (xv - mean) * rstd * g + b;
                }
            })
        });
    y
}

pub fn layer_norm_bwd(x: &[f32], g: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let n = gamma.len();
    let mut dx = vec![0f32; x.len()];
    let per = rows_per_task(n);
    dx.par_chunks_mut(n * per)
        .zip(x.par_chunks(n * per).zip(g.par_chunks(n * per)))
        .for_each(|(dx, (x, g))| {
            dispatch!(
                for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                    let (mean, rstd) = moments(x, eps);
                    for ((d, &gv), &gm) in dx.iter_mut().zip(g).zip(gamma) {
                        *d = gv * gm;
                    }
                    let m1 = lanes_sum(dx, |v| v) / n as f32;
                    let m2 = lanes_dot(dx, x, |v| (v - mean) * rstd) / n as f32;
                    for (d, &xv) in dx.iter_mut().zip(x) {
                        *d = rstd * (*d - m1 - (xv - mean) * rstd * m2);
                    }
                }
            )
        });
    dx
}
