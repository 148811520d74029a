//! Launches of geglu.cu: GEGLU forward and backward over `rows` rows `[h | gate]`.

use candle_core::{DType, Result};

use super::{module, stride_blocks, typed, Arg, Launch, Module};

pub(crate) static MODULE: Module = module!("geglu");

const THREADS: u32 = 256;

fn launch(
    base: &str,
    dtype: DType,
    mut args: Vec<Arg>,
    rows: usize,
    inner: usize,
) -> Result<Launch> {
    let (r, i) = (u32::try_from(rows), u32::try_from(inner));
    let (Ok(r), Ok(i)) = (r, i) else {
        candle_core::bail!("{base}: {rows} x {inner} is too large for one launch")
    };
    args.extend([Arg::U32(r), Arg::U32(i)]);
    Ok(Launch {
        module: &MODULE,
        kernel: typed(base, dtype)?,
        grid: [stride_blocks(rows * inner, THREADS), 1, 1],
        block: [THREADS, 1, 1],
        shared: 0,
        args,
    })
}

/// `y[rows, inner] = h * gelu_erf(gate)` for `x[rows, 2 * inner]`.
pub(crate) fn fwd(dtype: DType, x: Arg, y: Arg, rows: usize, inner: usize) -> Result<Launch> {
    launch("geglu_fwd", dtype, vec![x, y], rows, inner)
}

/// `dx[rows, 2 * inner]` from `x` and the output gradient `dy[rows, inner]`.
pub(crate) fn bwd(
    dtype: DType,
    x: Arg,
    dy: Arg,
    dx: Arg,
    rows: usize,
    inner: usize,
) -> Result<Launch> {
    launch("geglu_bwd", dtype, vec![x, dy, dx], rows, inner)
}
