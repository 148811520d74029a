//! The optimizer step's tensor math: squared-gradient sums, AdamW and the DS-Bal momentum
//! EMA. On CUDA each is one launch over all tensors (cuda/adamw.cu), where candle's ops
//! take several per tensor; elsewhere, or where the kernels are off, candle's ops, which
//! the kernels round exactly as.
//!
//! The kernels update parameters, moments and momentum weights in place, as `Var::set`
//! does, through addresses taken under the storages' read locks (candle gives no public
//! write lock on several tensors at once). So a tensor they update must not share its
//! storage with one a caller keeps: snapshots of it are taken with [`unshared`].

use candle_core::{DType, Device, Result, Tensor};

pub(crate) use super::cuda::adamw::Hyper;
use super::gate::{self, Comparison, Family};

/// The device of `ts` when the fused kernels take them all: contiguous f32 tensors on one
/// CUDA device that runs our kernels, the optimizer family on.
fn fused_on<'a>(ts: &[&'a Tensor]) -> Option<&'a Device> {
    let dev = ts.first()?.device();
    let all = ts
        .iter()
        .all(|t| t.device().same_device(dev) && t.dtype() == DType::F32 && t.is_contiguous());
    (dev.is_cuda()
        && all
        && gate::use_kernel(Family::Optimizer, dev, DType::F32, || check(dev, false)))
    .then_some(dev)
}

/// `t` with storage of its own on CUDA, where the fused kernels may later update the
/// original in place; `t` itself elsewhere (the CPU path never writes in place).
pub(crate) fn unshared(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cuda() {
        t.copy()
    } else {
        Ok(t.clone())
    }
}

/// One tensor of an AdamW step: parameter, gradient, moments; whether the gradient is
/// scaled by the clip coefficient.
pub(crate) struct Slot<'a> {
    pub p: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub clipped: bool,
}

/// One AdamW step's settings, in f64 as candle's ops take scalars.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step's number, from 1 (bias correction).
    pub step: usize,
    /// The clipped gradients' scale.
    pub coef: f64,
}

impl AdamWStep {
    /// The fused kernel's scalars, each cast to f32 as candle casts the scalar operand of
    /// `Tensor * f64` (`x as f32`; a division by `x` multiplies by `1 / x`).
    pub(crate) fn hyper(&self) -> Hyper {
        let (bc1, bc2) = self.bias_corrections();
        Hyper {
            coef: self.coef as f32,
            b1: self.beta1 as f32,
            omb1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            omb2: (1.0 - self.beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            lr: self.lr as f32,
        }
    }

    fn bias_corrections(&self) -> (f64, f64) {
        let t = self.step as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// One AdamW step by candle's ops: the new parameter and moments.
pub(crate) fn adamw_composed(slot: &Slot, s: &AdamWStep) -> Result<[Tensor; 3]> {
    // Always scaled when clipped, even by 1: `* 1.0 + 0.0` turns -0 into +0, as the
    // kernel does.
    let g = if slot.clipped {
        (slot.g * s.coef)?
    } else {
        slot.g.clone()
    };
    let (bc1, bc2) = s.bias_corrections();
    let m = ((slot.m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((slot.v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((&v / bc2)?.sqrt()? + s.eps)?;
    let update = ((&m / bc1)? / denom)?;
    let decayed = (slot.p.detach() * (1.0 - s.lr * s.weight_decay))?;
    Ok([(decayed - (update * s.lr)?)?, m, v])
}

/// Whether the CPU kernels take `t`: f32 on the CPU.
fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// One AdamW step of `slot` by the CPU kernel (one pass, rounded as [`adamw_composed`]),
/// where it takes the tensors: the new parameter and moments.
pub(crate) fn cpu_adamw(slot: &Slot, s: &AdamWStep) -> Result<Option<[Tensor; 3]>> {
    let ts = [slot.p, slot.g, slot.m, slot.v];
    if !ts.iter().all(|t| on_cpu_f32(t)) {
        return Ok(None);
    }
    let h = s.hyper();
    let out = super::with_f32(&ts, |t| {
        super::cpu::adamw((t[0], t[1], t[2], t[3]), &h, slot.clipped)
    })?;
    let shape = slot.p.shape();
    let [p, m, v] = out.map(|x| Tensor::from_vec(x, shape, &Device::Cpu));
    Ok(Some([p?, m?, v?]))
}

/// One AdamW step over all `slots` in one launch, where the fused kernel takes them.
/// `false`: it did not (not on CUDA, kernels off, or its launch failed and switched them
/// off), and the caller takes the step with [`adamw_composed`].
pub(crate) fn fused_adamw(slots: &[Slot], s: &AdamWStep) -> Result<bool> {
    let ts: Vec<&Tensor> = (slots.iter()).flat_map(|s| [s.p, s.g, s.m, s.v]).collect();
    let Some(dev) = fused_on(&ts) else {
        return Ok(false);
    };
    let done = gate::run(Family::Optimizer, dev, DType::F32, || {
        on_cuda::adamw(slots, &s.hyper())
    })?;
    Ok(done.is_some())
}

/// `m * beta + theta * (1 - beta)` by candle's ops.
pub(crate) fn ema_composed(m: &Tensor, theta: &Tensor, beta: f64) -> Result<Tensor> {
    (m * beta)? + (theta.detach() * (1.0 - beta))?
}

/// `m = m * beta + theta * (1 - beta)` for every `(m, theta)` pair in one launch, in place,
/// where the fused kernel takes them; `false` as for [`fused_adamw`] ([`ema_composed`]).
pub(crate) fn fused_ema(pairs: &[(&Tensor, &Tensor)], beta: f64) -> Result<bool> {
    let ts: Vec<&Tensor> = pairs.iter().flat_map(|&(m, t)| [m, t]).collect();
    let Some(dev) = fused_on(&ts) else {
        return Ok(false);
    };
    let done = gate::run(Family::Optimizer, dev, DType::F32, || {
        on_cuda::ema(pairs, beta)
    })?;
    Ok(done.is_some())
}

/// Per group, the sum of squares (f64) of the gradients tagged with it, `(gradient,
/// group)` with groups below `groups`: one launch and one device-to-host read on CUDA,
/// candle's ops (one read) elsewhere.
pub(crate) fn sq_sums(grads: &[(&Tensor, usize)], groups: usize) -> Result<Vec<f64>> {
    let ts: Vec<&Tensor> = grads.iter().map(|&(g, _)| g).collect();
    if let Some(dev) = fused_on(&ts) {
        let fused = || on_cuda::sq_sums(grads, groups);
        if let Some(sums) = gate::run(Family::Optimizer, dev, DType::F32, fused)? {
            return Ok(sums);
        }
    }
    let mut sums = vec![0f64; groups];
    if grads.is_empty() {
        return Ok(sums);
    }
    if ts.iter().all(|t| on_cpu_f32(t)) {
        for (g, gi) in grads {
            sums[*gi] += super::with_f32(&[g], |x| super::cpu::sq_sum(x[0]))?;
        }
        return Ok(sums);
    }
    let sq = (grads.iter())
        .map(|(g, _)| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let host = Tensor::stack(&sq, 0)?.to_vec1::<f64>()?;
    for (v, (_, gi)) in host.into_iter().zip(grads) {
        sums[*gi] += v;
    }
    Ok(sums)
}

/// The optimizer family's first-use check: the three kernels against candle's ops on
/// tensors with partial chunks (one spanning two), two of three clipped; `big`: SD 2.1's
/// LoRA set at rank 32 (about 25 M weights).
pub(crate) fn check(dev: &Device, big: bool) -> Result<Comparison> {
    let sizes: Vec<usize> = if big {
        vec![320 * 32; 2400]
    } else {
        vec![4097, 37, 5000]
    };
    let tensors = |seed: u64| -> Result<Vec<Tensor>> {
        (sizes.iter().enumerate())
            .map(|(i, &n)| gate::input(seed + 10 * i as u64, &[n], 0.01, 0.0, dev, DType::F32))
            .collect()
    };
    let (p, g, m, v) = (tensors(1)?, tensors(2)?, tensors(3)?, tensors(4)?);
    let v = v.iter().map(|v| v.sqr()).collect::<Result<Vec<_>>>()?;
    let s = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        step: 3,
        coef: 0.5,
    };
    let side = |kernels: bool| {
        gate::timed(dev, || {
            gate::forced(kernels, || optimizer_step(&p, &g, &m, &v, &s))
        })
    };
    let (got, kernel_seconds) = side(true)?;
    let (want, composed_seconds) = side(false)?;
    let pairs: Vec<(Tensor, Tensor)> = got.into_iter().zip(want).collect();
    Ok(Comparison {
        max_err: gate::max_rel_err(&pairs)?,
        kernel_seconds,
        composed_seconds,
    })
}

/// What a training step does with the optimizer kernels, on copies: the gradients' squared
/// sums (groups by parity), an AdamW step clipping every tensor but the second, and the
/// EMA of the moments towards the parameters; all results as tensors.
fn optimizer_step(
    p: &[Tensor],
    g: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    s: &AdamWStep,
) -> Result<Vec<Tensor>> {
    let copies = |ts: &[Tensor]| ts.iter().map(Tensor::copy).collect::<Result<Vec<_>>>();
    let (p, m, v) = (copies(p)?, copies(m)?, copies(v)?);
    let rows: Vec<(&Tensor, usize)> = g.iter().enumerate().map(|(i, g)| (g, i % 2)).collect();
    let sums = sq_sums(&rows, 2)?;
    let slots: Vec<Slot> = (0..p.len())
        .map(|i| Slot {
            p: &p[i],
            g: &g[i],
            m: &m[i],
            v: &v[i],
            clipped: i != 1,
        })
        .collect();
    let (p, mut m, v) = if fused_adamw(&slots, s)? {
        (p.clone(), m.clone(), v.clone())
    } else {
        let (mut np, mut nm, mut nv) = (Vec::new(), Vec::new(), Vec::new());
        for slot in &slots {
            let [a, b, c] = adamw_composed(slot, s)?;
            np.push(a);
            nm.push(b);
            nv.push(c);
        }
        (np, nm, nv)
    };
    let pairs: Vec<(&Tensor, &Tensor)> = m.iter().zip(&p).collect();
    if !fused_ema(&pairs, 0.9)? {
        m = (m.iter().zip(&p))
            .map(|(m, p)| ema_composed(m, p, 0.9))
            .collect::<Result<_>>()?;
    }
    let mut out = vec![Tensor::new(sums.as_slice(), &Device::Cpu)?];
    out.extend(p.into_iter().chain(m).chain(v));
    Ok(out)
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{bail, Device, Result, Storage, Tensor};

    use super::super::cuda::adamw::{self, Hyper, Table, CHUNK};
    use super::super::cuda::{self, Arg};
    use super::Slot;

    /// Runs `launch` over the table of `rows` (K same-sized tensors and a tag each), with
    /// every storage locked and its address held until the launch is queued.
    fn over<const K: usize>(
        rows: &[([&Tensor; K], u64)],
        launch: impl FnOnce(&CudaDevice, &Table, u64) -> Result<()>,
    ) -> Result<()> {
        let Some(Device::Cuda(dev)) = rows.first().map(|r| r.0[0].device()) else {
            bail!("the multi-tensor kernels take CUDA tensors")
        };
        let stream = dev.cuda_stream();
        let locked: Vec<_> = (rows.iter())
            .flat_map(|(ts, _)| ts.iter().map(|t| t.storage_and_layout()))
            .collect();
        let mut table = Table::new(CHUNK);
        let mut reads = Vec::with_capacity(locked.len());
        for ((ts, tag), locks) in rows.iter().zip(locked.chunks(K)) {
            let len = ts[0].elem_count();
            let mut ptrs = [0u64; 4];
            for (slot, (s, l)) in ptrs.iter_mut().zip(locks) {
                let Storage::Cuda(s) = &**s else {
                    bail!("the multi-tensor kernels take CUDA tensors")
                };
                if l.shape().elem_count() != len {
                    bail!("multi-tensor kernel: tensors of one row differ in size")
                }
                let (p, r) = cuda::input_ptr(s, l, &stream)?;
                *slot = p;
                reads.push(r);
            }
            table.push(ptrs, len, *tag);
        }
        if table.chunks() == 0 {
            return Ok(());
        }
        let words = dev.clone_htod(&table.words())?;
        let (tp, _t) = words.device_ptr(&stream);
        launch(dev, &table, tp)
    }

    pub fn sq_sums(grads: &[(&Tensor, usize)], groups: usize) -> Result<Vec<f64>> {
        let rows: Vec<_> = grads.iter().map(|&(g, gi)| ([g], gi as u64)).collect();
        let mut sums = vec![0f64; groups];
        over(&rows, |dev, t, table| {
            // [sums | per-chunk partial sums]
            let scratch = dev.alloc_zeros::<f64>(groups + t.chunks())?;
            {
                let stream = dev.cuda_stream();
                let (sp, _w) = scratch.device_ptr(&stream);
                let partial = Arg::Ptr(sp + 8 * groups as u64);
                cuda::run(
                    dev,
                    &adamw::sq_sums(t, table, groups, partial, Arg::Ptr(sp))?,
                )?;
            }
            sums = dev.clone_dtoh(&scratch.slice(..groups))?;
            Ok(())
        })?;
        Ok(sums)
    }

    pub fn adamw(slots: &[Slot], h: &Hyper) -> Result<()> {
        let rows: Vec<_> = (slots.iter())
            .map(|s| ([s.p, s.g, s.m, s.v], u64::from(s.clipped)))
            .collect();
        over(&rows, |dev, t, table| {
            cuda::run(dev, &adamw::step(t, table, h)?)
        })
    }

    pub fn ema(pairs: &[(&Tensor, &Tensor)], beta: f64) -> Result<()> {
        let rows: Vec<_> = pairs.iter().map(|&(m, theta)| ([m, theta], 0)).collect();
        over(&rows, |dev, t, table| {
            cuda::run(dev, &adamw::ema(t, table, beta)?)
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod on_cuda {
    use candle_core::{bail, Result, Tensor};

    use super::{Hyper, Slot};

    pub fn sq_sums(_: &[(&Tensor, usize)], _: usize) -> Result<Vec<f64>> {
        bail!("built without CUDA")
    }
    pub fn adamw(_: &[Slot], _: &Hyper) -> Result<()> {
        bail!("built without CUDA")
    }
    pub fn ema(_: &[(&Tensor, &Tensor)], _: f64) -> Result<()> {
        bail!("built without CUDA")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU kernel's AdamW step is the composed ops' bit for bit: clipped or not,
    /// across chunk boundaries, with -0 gradients and zero moments.
    #[test]
    fn cpu_adamw_rounds_as_the_composed_ops() {
        let dev = Device::Cpu;
        let t = |seed, n: usize, scale| gate::input(seed, &[n], scale, 0.0, &dev, DType::F32);
        for (n, clipped) in [(37, false), (40_000, true), (16_384, false)] {
            let (p, mut g, m) = (
                t(1, n, 0.1).unwrap(),
                t(2, n, 0.01).unwrap(),
                t(3, n, 0.01).unwrap(),
            );
            let v = t(4, n, 0.01).unwrap().sqr().unwrap();
            if n == 37 {
                g = (g * 0.0).unwrap().neg().unwrap(); // -0
            }
            let slot = Slot {
                p: &p,
                g: &g,
                m: &m,
                v: &v,
                clipped,
            };
            for step in [1, 7] {
                let s = AdamWStep {
                    lr: 2e-6,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-2,
                    step,
                    coef: 0.37,
                };
                let got = cpu_adamw(&slot, &s).unwrap().unwrap();
                let want = adamw_composed(&slot, &s).unwrap();
                for (a, b) in got.iter().zip(&want) {
                    let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "n {n}"
                    );
                }
            }
        }
    }
}
