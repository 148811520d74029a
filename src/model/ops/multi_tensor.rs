//! The optimizer step's multi-tensor CUDA kernels (cuda/adamw.cu) on candle tensors:
//! squared-gradient sums, AdamW and the DS-Bal momentum EMA, each one launch over all
//! tensors where candle's ops take several launches per tensor.
//!
//! The kernels update parameters, moments and momentum weights in place, as `Var::set`
//! does, through addresses taken under the storages' read locks (candle gives no public
//! write lock on several tensors at once). So a tensor they update must not share its
//! storage with one a caller keeps: snapshots of it are taken with [`unshared`].

use candle_core::{DType, Result, Tensor};

pub(crate) use super::cuda::adamw::Hyper;

/// Whether the fused kernels take `ts`: contiguous f32 tensors on one CUDA device, with
/// our kernels not switched off (`MAGICTAILOR_CUDA_KERNELS=0`).
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    first.device().is_cuda()
        && super::cuda::enabled()
        && ts.iter().all(|t| {
            t.device().same_device(first.device()) && t.dtype() == DType::F32 && t.is_contiguous()
        })
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
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Slot<'a> {
    pub p: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub clipped: bool,
}

/// Per group, the sum of squares (f64) of the gradients tagged with it, `(gradient,
/// group)` with groups below `groups`: one launch and one device-to-host read.
pub(crate) fn sq_sums(grads: &[(&Tensor, usize)], groups: usize) -> Result<Vec<f64>> {
    if grads.is_empty() {
        return Ok(vec![0.0; groups]);
    }
    on_cuda::sq_sums(grads, groups)
}

/// One AdamW step over all `slots` (one launch), with the scalars of `h`.
pub(crate) fn adamw(slots: &[Slot], h: &Hyper) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    on_cuda::adamw(slots, h)
}

/// `m = m * beta + theta * (1 - beta)` for every `(m, theta)` pair (one launch).
pub(crate) fn ema(pairs: &[(&Tensor, &Tensor)], beta: f64) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    on_cuda::ema(pairs, beta)
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
