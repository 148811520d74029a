//! Launches of flash.cu: attention forward (output and log-sum-exp) and backward (delta,
//! dK/dV, dQ) on token-major tensors.

use std::sync::OnceLock;

use candle_core::{bail, DType, Result};

use super::{module, typed, Arg, Launch, Module};

pub(crate) static MODULE: Module = module!("flash");

/// Threads per block of the tiled kernels: 128, or `MAGICTAILOR_FLASH_THREADS=256` (the
/// kernels size their loops from blockDim). 256 gives dK/dV, whose 125 KB of shared memory
/// allows one block per SM, 8 warps instead of 4; which is faster is yet to be measured.
fn threads() -> u32 {
    static THREADS: OnceLock<u32> = OnceLock::new();
    *THREADS.get_or_init(
        || match std::env::var("MAGICTAILOR_FLASH_THREADS").as_deref() {
            Ok("256") => 256,
            _ => 128,
        },
    )
}
/// Query rows of a forward or dQ tile; key rows of every tile.
const TILE: usize = 64;
/// The largest head dim (the tiles' shared memory grows with it).
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// The most dynamic shared memory a block gets on an H100.
const MAX_SHARED: usize = 227 * 1024;

/// Attention over token-major `q: [batch, n, heads * d]` and `k, v: [batch, m, heads * d]`:
/// the CPU kernel's shape.
pub(crate) use crate::kernels::cpu::AttnShape as Dims;

/// Elements of the f32 `[batch * heads, n]` log-sum-exp and delta buffers.
pub(crate) fn rows(s: &Dims) -> usize {
    s.batch * s.heads * s.n
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    match u32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("flash attention: {what} = {v} is too large for one launch"),
    }
}

/// heads, n, m, d, scale as the kernels take them, after checking the shape.
fn dim_args(s: &Dims) -> Result<Vec<Arg>> {
    if s.d == 0 || s.d > MAX_HEAD_DIM || s.n == 0 || s.m == 0 || s.heads == 0 {
        bail!("flash attention: no kernel for {s:?}")
    }
    Ok(vec![
        Arg::U32(u32_of(s.heads, "heads")?),
        Arg::U32(u32_of(s.n, "n")?),
        Arg::U32(u32_of(s.m, "m")?),
        Arg::U32(u32_of(s.d, "d")?),
        Arg::F32(s.scale),
    ])
}

/// Shared-memory bytes of arrays `(elements, bytes each)` carved in order, each rounded
/// up to 128 bytes, as `Carve` in flash.cu does.
fn carved(arrays: &[(usize, usize)]) -> usize {
    arrays
        .iter()
        .map(|&(n, b)| (n * b).div_ceil(128) * 128)
        .sum()
}

/// The pitches of flash.cu: input tiles (`in_pitch`), f32 accumulators (`acc_pitch`),
/// f32 scores and, for 16-bit types, separate probability tiles (f32 reuses the scores).
struct Pitches {
    input: usize,
    acc: usize,
    score: usize,
    prob: Option<usize>,
    elem: usize,
}

fn pitches(dtype: DType, d: usize) -> Pitches {
    let dp = d.div_ceil(16) * 16;
    Pitches {
        input: dp + 8,
        acc: dp + 4,
        score: TILE + 4,
        prob: (dtype != DType::F32).then_some(TILE + 8),
        elem: dtype.size_in_bytes(),
    }
}

impl Pitches {
    /// `rows` of an input tile, an f32 accumulator, f32 scores, probabilities, f32 stats.
    fn input(&self, rows: usize) -> (usize, usize) {
        (rows * self.input, self.elem)
    }
    fn acc(&self, rows: usize) -> (usize, usize) {
        (rows * self.acc, 4)
    }
    fn score(&self, rows: usize) -> (usize, usize) {
        (rows * self.score, 4)
    }
    fn prob(&self, rows: usize) -> (usize, usize) {
        (self.prob.map_or(0, |p| rows * p), self.elem)
    }
}

fn tiled(
    base: &str,
    dtype: DType,
    s: &Dims,
    tiles: usize,
    shared: usize,
    mut args: Vec<Arg>,
) -> Result<Launch> {
    if shared > MAX_SHARED {
        bail!("{base}: {shared} bytes of shared memory for {s:?}")
    }
    args.extend(dim_args(s)?);
    if s.batch * s.heads > 65_535 {
        bail!(
            "{base}: batch * heads = {} is over a grid's 65535 rows",
            s.batch * s.heads
        )
    }
    Ok(Launch {
        module: &MODULE,
        kernel: typed(base, dtype)?,
        grid: [
            u32_of(tiles, "tiles")?,
            u32_of(s.batch * s.heads, "batch * heads")?,
            1,
        ],
        block: [threads(), 1, 1],
        shared: shared as u32,
        args,
    })
}

/// `o` (like `q`) and the rows' log-sum-exp `lse` (f32 `[batch * heads, n]`), from
/// `[q, k, v, o, lse]`.
pub(crate) fn fwd(dtype: DType, s: &Dims, bufs: [Arg; 5]) -> Result<Launch> {
    let p = pitches(dtype, s.d);
    let t = TILE;
    let shared = carved(&[
        p.input(t),
        p.input(t),
        p.input(t),
        p.score(t),
        p.prob(t),
        p.acc(t),
        (t, 4),
        (t, 4),
    ]);
    tiled(
        "flash_fwd",
        dtype,
        s,
        s.n.div_ceil(t),
        shared,
        bufs.to_vec(),
    )
}

/// delta = <dO_i, O_i> per query row (f32 `[batch * heads, n]`), from `[o, g, delta]`.
pub(crate) fn delta(dtype: DType, s: &Dims, bufs: [Arg; 3]) -> Result<Launch> {
    const ROWS_PER_BLOCK: usize = 8; // a warp per row
    let rows = s.batch * s.n * s.heads;
    let mut args = bufs.to_vec();
    args.extend([
        Arg::U32(u32_of(rows, "rows")?),
        Arg::U32(u32_of(s.heads, "heads")?),
        Arg::U32(u32_of(s.n, "n")?),
        Arg::U32(u32_of(s.d, "d")?),
    ]);
    Ok(Launch {
        module: &MODULE,
        kernel: typed("flash_delta", dtype)?,
        grid: [u32_of(rows.div_ceil(ROWS_PER_BLOCK).max(1), "rows")?, 1, 1],
        block: [32 * ROWS_PER_BLOCK as u32, 1, 1],
        shared: 0,
        args,
    })
}

/// dK and dV (like `k`, `v`), one block per key tile, from
/// `[q, k, v, g, lse, delta, dk, dv]` (`g` the output gradient).
pub(crate) fn dkdv(dtype: DType, s: &Dims, bufs: [Arg; 8]) -> Result<Launch> {
    let p = pitches(dtype, s.d);
    // f32 halves the query tile to fit head dim 128 (dkdv_q_tile in flash.cu).
    let (t, qt) = (TILE, if dtype == DType::F32 { 32 } else { TILE });
    let shared = carved(&[
        p.input(t),
        p.input(t),
        p.acc(t),
        p.acc(t),
        p.input(qt),
        p.input(qt),
        p.score(qt),
        p.score(qt),
        p.prob(qt),
        p.prob(qt),
        (qt, 4),
        (qt, 4),
    ]);
    tiled(
        "flash_dkdv",
        dtype,
        s,
        s.m.div_ceil(t),
        shared,
        bufs.to_vec(),
    )
}

/// dQ (like `q`), one block per query tile, from `[q, k, v, g, lse, delta, dq]`.
pub(crate) fn dq(dtype: DType, s: &Dims, bufs: [Arg; 7]) -> Result<Launch> {
    let p = pitches(dtype, s.d);
    let t = TILE;
    let shared = carved(&[
        p.input(t),
        p.input(t),
        p.acc(t),
        p.input(t),
        p.input(t),
        p.score(t),
        p.score(t),
        p.prob(t),
        (t, 4),
        (t, 4),
    ]);
    tiled("flash_dq", dtype, s, s.n.div_ceil(t), shared, bufs.to_vec())
}

/// Whether every launch for `s` is possible on a GPU giving a block at most `shared_limit`
/// bytes of shared memory.
pub(crate) fn fits(dtype: DType, s: &Dims, shared_limit: usize) -> bool {
    let p = Arg::Ptr(0);
    [
        fwd(dtype, s, [p; 5]),
        dkdv(dtype, s, [p; 8]),
        dq(dtype, s, [p; 7]),
    ]
    .iter()
    .all(|l| l.as_ref().is_ok_and(|l| l.shared as usize <= shared_limit))
}
