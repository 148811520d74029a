//! Flash-style attention forward and backward: the score block of a row block stays in
//! cache and the probabilities are recomputed in backward from the log-sum-exp.

use rayon::prelude::*;

use super::{exp, gemm_raw, lanes_dot, lanes_max, LANES};

// Softmax over rows of length m.

/// In place: `row` becomes softmax(row); returns its log-sum-exp.
#[inline(always)]
fn softmax_row(row: &mut [f32]) -> f32 {
    let max = lanes_max(row);
    let mut sum = [0f32; LANES];
    let mut blocks = row.chunks_exact_mut(LANES);
    for block in &mut blocks {
        for (v, acc) in block.iter_mut().zip(&mut sum) {
            *v = exp(*v - max);
            *acc += *v;
        }
    }
    let mut sum: f32 = sum.iter().sum();
    for v in blocks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}

// Attention, flash-style, on token-major tensors: q `[b, n, heads * d]`, k/v
// `[b, m, heads * d]`, out `[b, n, heads * d]`; head h is the column block h*d..(h+1)*d,
// read and written in place through GEMM strides (no head transposes). Per (batch,
// head), blocks of BR query rows: the [BR, m] score block stays in cache and is never
// stored for backward (recomputed from the log-sum-exp).

const BR: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub scale: f32,
}

impl AttnShape {
    fn width(&self) -> usize {
        self.heads * self.d
    }
}

/// A raw f32 pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the tasks holding a `Shared` write disjoint (batch, head) column blocks.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer `offset` elements in (a method, so closures capture the `Shared`).
    ///
    /// SAFETY: `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// The attention kernels split work over rayon themselves: their GEMMs run on one thread.
const SEQ: gemm::Parallelism = gemm::Parallelism::None;

/// `dst[rows x m] = scale * Q_r K^T` for one head: q rows and k rows `c` apart.
///
/// SAFETY: as `gemm_raw`, for `rows` query rows and `m` key rows of head width `s.d`.
unsafe fn scores(
    dst: *mut f32,
    q: *const f32,
    k: *const f32,
    (rows, m): (usize, usize),
    s: &AttnShape,
) {
    let (d, c) = (s.d, s.width());
    unsafe {
        gemm_raw(
            (rows, m, d),
            dst,
            (m, 1),
            false,
            q,
            (c, 1),
            k,
            (1, c),
            s.scale,
            SEQ,
        )
    }
}

fn check_attn_lens(s: &AttnShape, q: usize, kv: usize) {
    assert!(
        q == s.batch * s.n * s.width() && kv == s.batch * s.m * s.width(),
        "attention buffers do not match their shape"
    );
}

/// `softmax(scale q k^T) v` per head; returns the output and each query row's
/// log-sum-exp `[batch * heads, n]`.
pub fn attention_fwd(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    check_attn_lens(s, q.len(), k.len().min(v.len()));
    let (n, m, d, c) = (s.n, s.m, s.d, s.width());
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; s.batch * s.heads * n];
    let (out_ptr, blocks) = (Shared(out.as_mut_ptr()), n.div_ceil(BR));
    // Tasks: (batch * heads) x query row blocks.
    let tasks: Vec<(usize, usize)> = (0..s.batch * s.heads)
        .flat_map(|bh| (0..blocks).map(move |blk| (bh, blk)))
        .collect();
    let lse_ptr = Shared(lse.as_mut_ptr());
    tasks.par_iter().for_each_init(
        || vec![0f32; BR * m],
        |buf, &(bh, blk)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let r0 = blk * BR;
            let rows = BR.min(n - r0);
            let sc = &mut buf[..rows * m];
            let qr = q[(b * n + r0) * c + h * d..].as_ptr();
            let kh = k[b * m * c + h * d..].as_ptr();
            let vh = v[b * m * c + h * d..].as_ptr();
            // SAFETY: the row block of head h in batch b lies inside q/k/v/out
            // (lengths checked above); this task alone writes its out rows and lse.
            let l = unsafe {
                scores(sc.as_mut_ptr(), qr, kh, (rows, m), s);
                std::slice::from_raw_parts_mut(lse_ptr.at(bh * n + r0), rows)
            };
            dispatch!(for (row, l) in sc.chunks_mut(m).zip(l.iter_mut()) {
                *l = softmax_row(row);
            });
            unsafe {
                let o = out_ptr.at((b * n + r0) * c + h * d);
                gemm_raw(
                    (rows, d, m),
                    o,
                    (c, 1),
                    false,
                    sc.as_ptr(),
                    (m, 1),
                    vh,
                    (c, 1),
                    1.0,
                    SEQ,
                );
            }
        },
    );
    (out, lse)
}

/// Gradients (dq, dk, dv) of `attention_fwd` given its output `o`, log-sum-exp and dL/do.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    g: &[f32],
    lse: &[f32],
    s: &AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    check_attn_lens(s, q.len().min(o.len()).min(g.len()), k.len().min(v.len()));
    assert_eq!(lse.len(), s.batch * s.heads * s.n, "log-sum-exp length");
    let (n, m, d, c) = (s.n, s.m, s.d, s.width());
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let head = |t: &[f32], rows: usize| t[b * rows * c + h * d..].as_ptr();
        let (kh, vh) = (head(k, m), head(v, m));
        let (mut p, mut ds) = (vec![0f32; BR * m], vec![0f32; BR * m]);
        for r0 in (0..n).step_by(BR) {
            let rows = BR.min(n - r0);
            let (p, ds) = (&mut p[..rows * m], &mut ds[..rows * m]);
            let at = (b * n + r0) * c + h * d;
            let (qr, gr) = (q[at..].as_ptr(), g[at..].as_ptr());
            // SAFETY: all blocks lie inside their buffers (lengths checked above); this
            // task alone writes head h of batch b in dq, dk and dv.
            unsafe {
                scores(p.as_mut_ptr(), qr, kh, (rows, m), s);
                gemm_raw(
                    (rows, m, d),
                    ds.as_mut_ptr(),
                    (m, 1),
                    false,
                    gr,
                    (c, 1),
                    vh,
                    (1, c),
                    1.0,
                    SEQ,
                );
            }
            dispatch!(
                for (i, (prow, dsrow)) in p.chunks_mut(m).zip(ds.chunks_mut(m)).enumerate() {
                    // delta_i = sum_j P_ij dP_ij = <dO_i, O_i>
                    let row = at + i * c;
                    let delta = lanes_dot(&g[row..][..d], &o[row..][..d], |x| x);
                    let l = lse[bh * n + r0 + i];
                    for (pv, dv) in prow.iter_mut().zip(dsrow.iter_mut()) {
                        *pv = exp(*pv - l);
                        *dv = *pv * (*dv - delta);
                    }
                }
            );
            unsafe {
                let dvh = dv_ptr.at(b * m * c + h * d);
                gemm_raw(
                    (m, d, rows),
                    dvh,
                    (c, 1),
                    true,
                    p.as_ptr(),
                    (1, m),
                    gr,
                    (c, 1),
                    1.0,
                    SEQ,
                );
                let dqr = dq_ptr.at(at);
                gemm_raw(
                    (rows, d, m),
                    dqr,
                    (c, 1),
                    false,
                    ds.as_ptr(),
                    (m, 1),
                    kh,
                    (c, 1),
                    s.scale,
                    SEQ,
                );
                let dkh = dk_ptr.at(b * m * c + h * d);
                gemm_raw(
                    (m, d, rows),
                    dkh,
                    (c, 1),
                    true,
                    ds.as_ptr(),
                    (1, m),
                    qr,
                    (c, 1),
                    s.scale,
                    SEQ,
                );
            }
        }
    });
    (dq, dk, dv)
}
