//! Launches of norm.cu: GroupNorm (+ SiLU) over `x[batch, channels, hw]`, one block per
//! (batch, group), and LayerNorm over rows, one warp per row.

use candle_core::{bail, DType, Result};

use super::{module, typed, Arg, Launch, Module};
use crate::kernels::cpu::GroupNormShape;

pub(crate) static MODULE: Module = module!("norm");

/// Rows (one warp each) per LayerNorm block: norm.cu's `LN_ROWS`.
const LN_ROWS: u32 = 8;

fn u32_of(what: &str, v: usize) -> Result<u32> {
    match u32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("{what} = {v} is too large for one launch"),
    }
}

/// Threads per GroupNorm block: about 32 elements (four 16-byte packs of bf16) each.
fn group_threads(group_len: usize) -> u32 {
    (group_len / 32).next_power_of_two().clamp(64, 1024) as u32
}

fn group_launch(
    base: &str,
    dtype: DType,
    mut args: Vec<Arg>,
    s: &GroupNormShape,
    batch: usize,
) -> Result<Launch> {
    if s.groups == 0 || !s.channels.is_multiple_of(s.groups) {
        bail!("{base}: {} channels in {} groups", s.channels, s.groups)
    }
    let blocks = u32_of("batch * groups", batch * s.groups)?;
    args.extend([
        Arg::U32(u32_of("channels", s.channels)?),
        Arg::U32(u32_of("hw", s.hw)?),
        Arg::U32(u32_of("groups", s.groups)?),
        Arg::F32(s.eps),
        Arg::U32(s.silu.into()),
    ]);
    Ok(Launch {
        module: &MODULE,
        kernel: typed(base, dtype)?,
        grid: [blocks, 1, 1],
        block: [group_threads(s.channels / s.groups * s.hw), 1, 1],
        shared: 0,
        args,
    })
}

/// `y = [silu](groupnorm(x) * gamma + beta)` for `x[batch, channels, hw]`; `io` is
/// `[x, gamma, beta, y]`. Not for empty `x` (a grid of no blocks does not launch).
pub(crate) fn group_fwd(
    dtype: DType,
    io: [Arg; 4],
    s: &GroupNormShape,
    batch: usize,
) -> Result<Launch> {
    group_launch("gn_fwd", dtype, io.to_vec(), s, batch)
}

/// dL/dx of `group_fwd` from its output gradient; `io` is `[x, dy, gamma, beta, dx]`.
pub(crate) fn group_bwd(
    dtype: DType,
    io: [Arg; 5],
    s: &GroupNormShape,
    batch: usize,
) -> Result<Launch> {
    group_launch("gn_bwd", dtype, io.to_vec(), s, batch)
}

fn layer_launch(
    base: &str,
    dtype: DType,
    mut args: Vec<Arg>,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Launch> {
    let blocks = u32_of("rows / 8", rows.div_ceil(LN_ROWS as usize))?;
    args.extend([
        Arg::U32(u32_of("rows", rows)?),
        Arg::U32(u32_of("row length", n)?),
        Arg::F32(eps),
    ]);
    Ok(Launch {
        module: &MODULE,
        kernel: typed(base, dtype)?,
        grid: [blocks.max(1), 1, 1],
        block: [32 * LN_ROWS, 1, 1],
        shared: 0,
        args,
    })
}

/// `y = layernorm(x) * gamma + beta` over `rows` rows of `n`; `io` is `[x, gamma, beta, y]`.
pub(crate) fn layer_fwd(
    dtype: DType,
    io: [Arg; 4],
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Launch> {
    layer_launch("ln_fwd", dtype, io.to_vec(), rows, n, eps)
}

/// dL/dx of `layer_fwd` from its output gradient; `io` is `[x, dy, gamma, dx]`.
pub(crate) fn layer_bwd(
    dtype: DType,
    io: [Arg; 4],
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Launch> {
    layer_launch("ln_bwd", dtype, io.to_vec(), rows, n, eps)
}
