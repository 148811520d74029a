//! The LoRA linear layer's forward and backward as a handful of GEMMs, folding the
//! adapter into the weight where that is cheaper.

use rayon::prelude::*;

use super::mm_par;

// Linear layer with a LoRA adapter: y = x W^T + bias + s (x A^T) B^T, as one op.

/// Sizes: `m` rows, `k` inputs, `n` outputs, rank `r`.
pub struct LoraDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
}

impl LoraDims {
    /// Whether the forward folds the adapter into the weight, `W' = W + s B A`: that
    /// costs `n k r` multiply-adds against `m r (k + n)` for the rank-r products, and
    /// one GEMM of the size the rank-r ones are slow at against two.
    pub fn merged_forward(&self) -> bool {
        self.n * self.k < self.m * (self.k + self.n)
    }

    /// Whether the backward folds it too: then it costs `2 m n k + 3 n k r`
    /// (dx = g W', G = g^T x, dA and dB from G) against `m n k + m r (3 k + 2 n)`
    /// (u = x A^T again, g B, dx = g W + (g B) A, dA, dB). Narrow layers fold.
    pub fn merged_backward(&self) -> bool {
        let (m, k, n, r) = (self.m, self.k, self.n, self.r);
        n * k * (m + 3 * r) < m * r * (3 * k + 2 * n)
    }
}

/// `W + s B A`, `[n, k]`.
fn merged_weight(w: &[f32], a: &[f32], b: &[f32], d: &LoraDims) -> Vec<f32> {
    let (k, n, r) = (d.k, d.n, d.r);
    let mut wm = w.to_vec();
    mm_par(
        (n, k, r),
        &mut wm,
        (k, 1),
        true,
        b,
        (r, 1),
        a,
        (k, 1),
        d.scale,
    );
    wm
}

/// Forward of the adapted linear layer; x `[m, k]`, w `[n, k]`, a `[r, k]`, b `[n, r]`.
pub fn lora_linear_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    d: &LoraDims,
) -> Vec<f32> {
    let (m, k, n, r) = (d.m, d.k, d.n, d.r);
    let mut y = vec![0f32; m * n];
    if let Some(bias) = bias {
        y.par_chunks_mut(n)
            .for_each(|row| row.copy_from_slice(bias));
    }
    let merged = d.merged_forward().then(|| merged_weight(w, a, b, d));
    let weight = merged.as_deref().unwrap_or(w);
    let acc = bias.is_some();
    mm_par(
        (m, n, k),
        &mut y,
        (n, 1),
        acc,
        x,
        (k, 1),
        weight,
        (1, k),
        1.0,
    );
    if merged.is_some() {
        return y;
    }
    let mut u = vec![0f32; m * r];
    mm_par((m, r, k), &mut u, (r, 1), false, x, (k, 1), a, (1, k), 1.0);
    mm_par(
        (m, n, r),
        &mut y,
        (n, 1),
        true,
        &u,
        (r, 1),
        b,
        (1, r),
        d.scale,
    );
    y
}

/// Gradients (dx, da, db) of `lora_linear_fwd` given dL/dy `g` `[m, n]`.
pub fn lora_linear_bwd(
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    g: &[f32],
    d: &LoraDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (m, k, n, r) = (d.m, d.k, d.n, d.r);
    let (mut dx, mut da, mut db) = (vec![0f32; m * k], vec![0f32; r * k], vec![0f32; n * r]);
    if d.merged_backward() {
        let wm = merged_weight(w, a, b, d);
        mm_par(
            (m, k, n),
            &mut dx,
            (k, 1),
            false,
            g,
            (n, 1),
            &wm,
            (k, 1),
            1.0,
        );
        // G = g^T x is dL/dW'; dA = s B^T G, dB = s G A^T.
        let mut gx = vec![0f32; n * k];
        mm_par((n, k, m), &mut gx, (k, 1), false, g, (1, n), x, (k, 1), 1.0);
        mm_par(
            (r, k, n),
            &mut da,
            (k, 1),
            false,
            b,
            (1, r),
            &gx,
            (k, 1),
            d.scale,
        );
        mm_par(
            (n, r, k),
            &mut db,
            (r, 1),
            false,
            &gx,
            (k, 1),
            a,
            (1, k),
            d.scale,
        );
        return (dx, da, db);
    }
    let mut u = vec![0f32; m * r];
    mm_par((m, r, k), &mut u, (r, 1), false, x, (k, 1), a, (1, k), 1.0);
    // gu = s g B: the gradient reaching x A^T.
    let mut gu = vec![0f32; m * r];
    mm_par(
        (m, r, n),
        &mut gu,
        (r, 1),
        false,
        g,
        (n, 1),
        b,
        (r, 1),
        d.scale,
    );
    mm_par((m, k, n), &mut dx, (k, 1), false, g, (n, 1), w, (k, 1), 1.0);
    mm_par(
        (m, k, r),
        &mut dx,
        (k, 1),
        true,
        &gu,
        (r, 1),
        a,
        (k, 1),
        1.0,
    );
    mm_par(
        (r, k, m),
        &mut da,
        (k, 1),
        false,
        &gu,
        (1, r),
        x,
        (k, 1),
        1.0,
    );
    mm_par(
        (n, r, m),
        &mut db,
        (r, 1),
        false,
        g,
        (1, n),
        &u,
        (r, 1),
        d.scale,
    );
    (dx, da, db)
}
