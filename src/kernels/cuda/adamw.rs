//! Launches of adamw.cu: the optimizer step's multi-tensor kernels. Each takes a table of
//! per-tensor segments ([`Table`]), built on the host every step (gradients move) and
//! uploaded in one copy.

use candle_core::{bail, Result};

use super::{module, Arg, Launch, Module};

pub(crate) static MODULE: Module = module!("adamw");

const THREADS: u32 = 256;
/// Elements per block: 16 per thread, a few blocks per LoRA matrix.
pub(crate) const CHUNK: u32 = 4096;
/// 64-bit words per segment (adamw.cu's `Segment`).
const WORDS: usize = 8;

/// The segments of one launch: per tensor up to four buffer addresses (which, by kernel),
/// its length, its first chunk and a tag; then the zeroed counter `grad_sq_sums` uses.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    words: Vec<u64>,
    chunk: u32,
    chunks: u64,
}

impl Table {
    pub(crate) fn new(chunk: u32) -> Self {
        Self {
            words: Vec::new(),
            chunk,
            chunks: 0,
        }
    }

    pub(crate) fn push(&mut self, ptrs: [u64; 4], len: usize, tag: u64) {
        self.words.extend(ptrs);
        self.words.extend([len as u64, self.chunks, tag, 0]);
        self.chunks += (len as u64).div_ceil(self.chunk as u64);
    }

    /// What to upload: the segments, then the counter.
    pub(crate) fn words(&self) -> Vec<u64> {
        let mut w = self.words.clone();
        w.push(0);
        w
    }

    /// Blocks a launch over the table takes (one per chunk).
    pub(crate) fn chunks(&self) -> usize {
        self.chunks as usize
    }

    fn segments(&self) -> usize {
        self.words.len() / WORDS
    }

    /// The launch of `kernel` over the table uploaded at `table`, with `extra` arguments
    /// after (segments, count[, ...], chunk).
    fn launch(
        &self,
        kernel: &str,
        table: u64,
        before_chunk: &[Arg],
        extra: &[Arg],
    ) -> Result<Launch> {
        let (Ok(n), Ok(blocks)) = (u32::try_from(self.segments()), u32::try_from(self.chunks))
        else {
            bail!(
                "{kernel}: {} chunks are too many for one launch",
                self.chunks
            )
        };
        if blocks == 0 {
            bail!("{kernel}: nothing to do (no elements)")
        }
        let mut args = vec![Arg::Ptr(table), Arg::U32(n)];
        args.extend_from_slice(before_chunk);
        args.push(Arg::U32(self.chunk));
        args.extend_from_slice(extra);
        Ok(Launch {
            module: &MODULE,
            kernel: kernel.into(),
            grid: [blocks, 1, 1],
            block: [THREADS, 1, 1],
            shared: 0,
            args,
        })
    }
}

/// Squared-gradient sums per group, tags being groups (< `groups`): `partial` holds
/// `table.chunks()` f64 of scratch, `sums` receives `groups` f64.
pub(crate) fn sq_sums(
    t: &Table,
    table: u64,
    groups: usize,
    partial: Arg,
    sums: Arg,
) -> Result<Launch> {
    let Ok(groups) = u32::try_from(groups) else {
        bail!("grad_sq_sums: {groups} groups")
    };
    let counter = Arg::Ptr(table + (t.segments() * WORDS * 8) as u64);
    t.launch(
        "grad_sq_sums",
        table,
        &[Arg::U32(groups)],
        &[partial, counter, sums],
    )
}

/// AdamW's per-step scalars in f32 (the CPU kernel's too).
pub(crate) use crate::kernels::cpu::AdamWScalars as Hyper;

/// One AdamW step over segments (p, g, m, v), tag 1 marking a clipped gradient.
pub(crate) fn step(t: &Table, table: u64, h: &Hyper) -> Result<Launch> {
    let f = [
        h.coef, h.b1, h.omb1, h.b2, h.omb2, h.inv_bc1, h.inv_bc2, h.eps, h.decay, h.lr,
    ];
    t.launch("adamw_step", table, &[], &f.map(Arg::F32))
}

/// `m = m * beta + theta * (1 - beta)` over segments (m, theta).
pub(crate) fn ema(t: &Table, table: u64, beta: f64) -> Result<Launch> {
    let f = [beta as f32, (1.0 - beta) as f32];
    t.launch("ema_update", table, &[], &f.map(Arg::F32))
}
