//! Which ops run through our kernels (the CPU's under `cpu/`, CUDA's under `cuda/`).
//!
//! Each kernel family is checked the first time it runs in a process on a device in a
//! dtype: once, on a small case with partial tiles, against candle's composed op, forward
//! and backward. A family whose launch fails there, or whose values miss the tolerance,
//! is switched off on that device and dtype for the rest of the process, with one
//! warning; so is a family whose launch fails later, where the device survives it. The
//! composed op takes over: slower, never wrong. `MAGICTAILOR_CUDA_KERNELS=0` switches the
//! CUDA kernels off, `=1` keeps them on without the check.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::{DType, Device, DeviceLocation, Result, Tensor, Var};

/// A family of kernels, checked and switched off together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Attention,
    GroupNorm,
    LayerNorm,
    Geglu,
    /// AdamW, the gradients' squared sums and the DS-Bal EMA (CUDA only).
    Optimizer,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Attention,
        Family::GroupNorm,
        Family::LayerNorm,
        Family::Geglu,
        Family::Optimizer,
    ];

    /// Its name in messages, reports and `MAGICTAILOR_KERNEL_FAULT`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Attention => "attention",
            Family::GroupNorm => "group-norm",
            Family::LayerNorm => "layer-norm",
            Family::Geglu => "geglu",
            Family::Optimizer => "optimizer",
        }
    }

    /// max |kernel - composed| / max |composed| allowed: what the kernels' own tests
    /// hold, where 16-bit storage rounds every input and output to 8 or 11 bits.
    pub fn tolerance(self, dtype: DType) -> f32 {
        match (self, dtype) {
            (Family::Optimizer, _) => 1e-6,
            (Family::Attention, DType::F32) => 1e-4,
            (_, DType::F32) => 2e-5,
            (Family::Attention, _) => 2e-2,
            _ => 1e-2,
        }
    }
}

/// How a family's first-use check went.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within tolerance: the kernels run.
    Passed { max_err: f32, seconds: f64 },
    /// `MAGICTAILOR_CUDA_KERNELS=1`: the kernels run unchecked.
    Unchecked,
    /// Switched off, and why: the composed op runs.
    Off(String),
}

impl Verdict {
    pub fn is_on(&self) -> bool {
        !matches!(self, Verdict::Off(_))
    }
}

/// One family's state on one device in one dtype, for reports and the run record.
#[derive(Debug, Clone)]
pub struct Entry {
    pub device: DeviceLocation,
    pub family: Family,
    pub dtype: DType,
    pub verdict: Verdict,
}

impl Entry {
    /// `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        match self.device {
            DeviceLocation::Cpu => "cpu".into(),
            DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}"),
        }
    }

    /// For the run record and `doctor --json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "device": self.device_name(),
            "family": self.family.name(),
            "dtype": self.dtype.as_str(),
        });
        match &self.verdict {
            Verdict::Passed { max_err, seconds } => {
                v["state"] = "checked".into();
                v["max_rel_err"] = max_err.to_string().parse::<f64>().unwrap_or(0.0).into();
                v["check_seconds"] = (*seconds).into();
            }
            Verdict::Unchecked => v["state"] = "unchecked".into(),
            Verdict::Off(why) => {
                v["state"] = "off".into();
                v["why"] = why.clone().into();
            }
        }
        v
    }
}

type Key = (DeviceLocation, Family, DType);

fn states() -> &'static Mutex<HashMap<Key, Verdict>> {
    static STATES: OnceLock<Mutex<HashMap<Key, Verdict>>> = OnceLock::new();
    STATES.get_or_init(Default::default)
}

thread_local! {
    /// Set while a check runs on this thread: its kernel side (true) or its composed
    /// side (false), whatever the states say.
    static FORCED: Cell<Option<bool>> = const { Cell::new(None) };
}

/// `f` with every family's kernels forced on (`kernels`) or off on this thread.
pub(crate) fn forced<R>(kernels: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(kernels))));
    f()
}

/// Where kernels might run: the CPU, or a CUDA GPU of this compute capability with our
/// kernels switched on or off (`MAGICTAILOR_CUDA_KERNELS`).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum Place {
    Cpu,
    Cuda { major: i32, enabled: bool },
    Other,
}

/// Whether `family` has kernels for `place` and `dtype`: the CPU's in f32 (no optimizer
/// kernels there); CUDA's in f32, bf16 and f16 (the optimizer's in f32) from compute
/// capability 8.0 (the fatbins' oldest code; bf16 tensor cores), unless switched off.
pub(crate) fn kernels_exist(family: Family, place: Place, dtype: DType) -> bool {
    match place {
        Place::Cpu => dtype == DType::F32 && family != Family::Optimizer,
        Place::Cuda { major, enabled } => {
            let dtype_ok = match family {
                Family::Optimizer => dtype == DType::F32,
                _ => matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
            };
            dtype_ok && enabled && major >= 8
        }
        Place::Other => false,
    }
}

fn place(dev: &Device) -> Place {
    match dev {
        Device::Cpu => Place::Cpu,
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Place::Cuda {
            major: super::cuda::compute_major(d),
            enabled: super::cuda::enabled(),
        },
        _ => Place::Other,
    }
}

pub(crate) fn exists(family: Family, dev: &Device, dtype: DType) -> bool {
    kernels_exist(family, place(dev), dtype)
}

/// Whether `family`'s kernels take work on `dev` in `dtype`: checked at the first call,
/// by `check` (the family's kernels against the composed op on a small case).
pub(crate) fn use_kernel(
    family: Family,
    dev: &Device,
    dtype: DType,
    check: impl FnOnce() -> Result<Comparison>,
) -> bool {
    if !exists(family, dev, dtype) {
        return false;
    }
    if let Some(on) = FORCED.with(Cell::get) {
        return on;
    }
    let key = (dev.location(), family, dtype);
    let Ok(mut states) = states().lock() else {
        return false;
    };
    if let Some(v) = states.get(&key) {
        return v.is_on();
    }
    // The lock is held through the check: a second thread waits for its verdict.
    let verdict = if dev.is_cuda() && super::cuda::unchecked() {
        Verdict::Unchecked
    } else {
        judge(family, dtype, check)
    };
    if let Verdict::Off(why) = &verdict {
        warn_off(family, dev, dtype, why);
    }
    let on = verdict.is_on();
    states.insert(key, verdict);
    on
}

/// Runs `family`'s check (`check`) now (again, if it ran before), records and returns its
/// verdict.
pub(crate) fn recheck(
    family: Family,
    dev: &Device,
    dtype: DType,
    check: impl FnOnce() -> Result<Comparison>,
) -> Verdict {
    if !exists(family, dev, dtype) {
        return Verdict::Off("no kernels for this device and dtype".into());
    }
    let verdict = judge(family, dtype, check);
    if let Ok(mut states) = states().lock() {
        states.insert((dev.location(), family, dtype), verdict.clone());
    }
    verdict
}

/// Every family's state so far, in a stable order.
pub fn entries() -> Vec<Entry> {
    let Ok(states) = states().lock() else {
        return Vec::new();
    };
    let mut v: Vec<Entry> = (states.iter())
        .map(|(&(device, family, dtype), verdict)| Entry {
            device,
            family,
            dtype,
            verdict: verdict.clone(),
        })
        .collect();
    v.sort_by_key(|e| (format!("{:?}", e.device), e.family as u8, e.dtype.as_str()));
    v
}

/// The verdict on `family`'s kernels in `dtype` from its check.
fn judge(family: Family, dtype: DType, check: impl FnOnce() -> Result<Comparison>) -> Verdict {
    let start = Instant::now();
    let result = check().map(|c| c.max_err);
    let seconds = start.elapsed().as_secs_f64();
    let tol = family.tolerance(dtype);
    match result {
        Ok(e) if e <= tol => Verdict::Passed {
            max_err: e,
            seconds,
        },
        Ok(e) => Verdict::Off(format!(
            "its values differ from the composed op's by {e:.2e} (relative; allowed {tol:.0e})"
        )),
        Err(e) => Verdict::Off(format!("it failed: {}", crate::error::brief(&e))),
    }
}

fn where_(dev: &Device, dtype: DType) -> String {
    match dev.location() {
        DeviceLocation::Cpu => format!("the CPU in {}", dtype.as_str()),
        DeviceLocation::Cuda { gpu_id } => format!("CUDA device {gpu_id} in {}", dtype.as_str()),
        other => format!("{other:?} in {}", dtype.as_str()),
    }
}

fn warn_off(family: Family, dev: &Device, dtype: DType, why: &str) {
    crate::io::console::note(format_args!(
        "warning: the {} kernels are off on {} for the rest of this run: {why}. candle's \
         composed ops take over (slower, same results within rounding). Please report this \
         with the output of `magictailor doctor --json`.",
        family.name(),
        where_(dev, dtype)
    ));
}

/// Runs `family`'s kernel path `f` on `dev` in `dtype`. `Ok(None)`: it failed and the
/// family is now off, so the caller computes the composed op instead. An error: the
/// failure left the device unusable.
pub(crate) fn run<T: Skew>(
    family: Family,
    dev: &Device,
    dtype: DType,
    f: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    let result = match fault(family) {
        Some(Fault::Fail) => Err(candle_core::Error::Msg(format!(
            "injected launch failure (MAGICTAILOR_KERNEL_FAULT) in {}",
            family.name()
        ))),
        Some(Fault::Disagree) => f().and_then(T::skew),
        None => f(),
    };
    let err = match result {
        Ok(v) => return Ok(Some(v)),
        Err(e) => e,
    };
    if fatal(&err) {
        return Err(candle_core::Error::Msg(format!(
            "a {} kernel failed on {} and left the GPU unusable: {}. Rerun with \
             MAGICTAILOR_CUDA_KERNELS=0 to use candle's ops instead, and please report it with \
             the output of `magictailor doctor --json`.",
            family.name(),
            where_(dev, dtype),
            crate::error::brief(&err)
        )));
    }
    if FORCED.with(Cell::get).is_some() {
        return Err(err); // inside a check: the check reports it
    }
    let why = format!("a launch failed: {}", crate::error::brief(&err));
    warn_off(family, dev, dtype, &why);
    if let Ok(mut states) = states().lock() {
        states.insert((dev.location(), family, dtype), Verdict::Off(why));
    }
    Ok(None)
}

/// CUDA errors after which the context cannot be used again (the "sticky" ones).
const STICKY: [&str; 8] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
];

fn fatal(e: &candle_core::Error) -> bool {
    is_sticky(&format!("{e:?}"))
}

/// Whether an error's text names a CUDA error that leaves the GPU unusable.
fn is_sticky(text: &str) -> bool {
    STICKY.iter().any(|s| text.contains(s))
}

/// For an error that stopped a command: where it names a CUDA error that leaves the GPU
/// unusable (reported by whichever op synchronized next, not necessarily the culprit),
/// what to do about it.
pub fn sticky_error_hint(text: &str) -> Option<&'static str> {
    is_sticky(text).then_some(
        "the GPU reported an error that ends this process's use of it. If it recurs, rerun \
         with MAGICTAILOR_CUDA_KERNELS=0 (candle's ops instead of ours) to tell whether our \
         kernels cause it, and report it with the output of `magictailor doctor --json`.",
    )
}

/// A kernel result a test fault can skew.
pub(crate) trait Skew: Sized {
    fn skew(self) -> Result<Self>;
}

impl Skew for Tensor {
    fn skew(self) -> Result<Self> {
        self.affine(1.01, 0.0)
    }
}

impl Skew for () {
    fn skew(self) -> Result<Self> {
        Ok(())
    }
}

impl Skew for (Tensor, Tensor, Tensor) {
    fn skew(self) -> Result<Self> {
        Ok((self.0.skew()?, self.1, self.2))
    }
}

impl Skew for Vec<f64> {
    fn skew(self) -> Result<Self> {
        Ok(self.into_iter().map(|v| v * 1.01).collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(not(debug_assertions), allow(dead_code))]
enum Fault {
    Fail,
    Disagree,
}

/// A test hook (debug builds): `MAGICTAILOR_KERNEL_FAULT=FAMILY:disagree` skews every
/// result of that family's kernels, `FAMILY:fail` fails every launch, `FAMILY:fail-after=N`
/// every launch after the first N.
#[cfg(debug_assertions)]
fn fault(family: Family) -> Option<Fault> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static LAUNCHES: AtomicUsize = AtomicUsize::new(0);
    let spec = std::env::var("MAGICTAILOR_KERNEL_FAULT").ok()?;
    let (name, kind) = spec.split_once(':')?;
    if name != family.name() {
        return None;
    }
    match kind {
        "disagree" => Some(Fault::Disagree),
        "fail" => Some(Fault::Fail),
        _ => {
            let after: usize = kind.strip_prefix("fail-after=")?.parse().ok()?;
            let n = LAUNCHES.fetch_add(1, Ordering::Relaxed);
            (n >= after).then_some(Fault::Fail)
        }
    }
}

#[cfg(not(debug_assertions))]
fn fault(_: Family) -> Option<Fault> {
    None
}

/// max |a - b| / max |b| over the pairs of tensors (compared in f32 on the CPU).
pub(crate) fn max_rel_err(pairs: &[(Tensor, Tensor)]) -> Result<f32> {
    let mut worst = 0f32;
    for (a, b) in pairs {
        let (a, b) = (host_f32(a)?, host_f32(b)?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        let e = if scale > 0.0 { diff / scale } else { diff };
        // NaN compares false: make it the worst.
        worst = if e.is_nan() {
            f32::INFINITY
        } else {
            worst.max(e)
        };
    }
    Ok(worst)
}

fn host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.to_device(&Device::Cpu)
}

/// An op's value and its inputs' gradients for `L = sum(op(inputs) * g)`, with the kernels
/// forced on or off: the two sides of a first-use check.
pub(crate) fn value_and_grads(
    kernels: bool,
    inputs: &[Tensor],
    g: &Tensor,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    forced(kernels, || {
        let vars = (inputs.iter())
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = op(&tensors)?;
        let grads = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let mut out = vec![y.detach()];
        for t in &tensors {
            match grads.get(t) {
                Some(d) => out.push(d.detach()),
                None => candle_core::bail!("the check's op gave an input no gradient"),
            }
        }
        Ok(out)
    })
}

/// A family's kernels against the composed op on some case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The worst max |kernel - composed| / max |composed| over values and gradients.
    pub max_err: f32,
    /// Seconds each side took (forward and backward), the device synchronized.
    pub kernel_seconds: f64,
    pub composed_seconds: f64,
}

impl Comparison {
    /// Both over several cases: the worst error, the summed times.
    pub fn and(self, other: Comparison) -> Comparison {
        Comparison {
            max_err: self.max_err.max(other.max_err),
            kernel_seconds: self.kernel_seconds + other.kernel_seconds,
            composed_seconds: self.composed_seconds + other.composed_seconds,
        }
    }

    /// Nothing compared yet (the identity of `and`).
    pub fn none() -> Comparison {
        Comparison {
            max_err: 0.0,
            kernel_seconds: 0.0,
            composed_seconds: 0.0,
        }
    }
}

/// `f`'s result and its seconds, `dev` synchronized at both ends.
pub(crate) fn timed<R>(dev: &Device, f: impl FnOnce() -> Result<R>) -> Result<(R, f64)> {
    dev.synchronize()?;
    let start = Instant::now();
    let r = f()?;
    dev.synchronize()?;
    Ok((r, start.elapsed().as_secs_f64()))
}

/// The kernel side against the composed side of `op` on `inputs`.
pub(crate) fn compare(
    inputs: &[Tensor],
    g: &Tensor,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Comparison> {
    let dev = g.device();
    let (got, kernel_seconds) = timed(dev, || value_and_grads(true, inputs, g, &op))?;
    let (want, composed_seconds) = timed(dev, || value_and_grads(false, inputs, g, &op))?;
    Ok(Comparison {
        max_err: max_rel_err(&got.into_iter().zip(want).collect::<Vec<_>>())?,
        kernel_seconds,
        composed_seconds,
    })
}

/// A seeded normal check input, `* scale + shift`, in `dtype` on `dev`.
pub(crate) fn input(
    seed: u64,
    dims: &[usize],
    scale: f64,
    shift: f64,
    dev: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let n = dims.iter().product();
    let values = crate::rng::normals(&mut crate::rng::seeded(seed), n);
    Tensor::from_vec(values, dims, dev)?
        .affine(scale, shift)?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimizer kernels, like the others, need compute capability 8.0 (a T4 or V100
    /// keeps candle's ops) and stay off with `MAGICTAILOR_CUDA_KERNELS=0`.
    #[test]
    fn kernels_exist_only_where_their_code_runs() {
        let gpu = |major, enabled| Place::Cuda { major, enabled };
        for family in Family::ALL {
            assert!(
                !kernels_exist(family, gpu(7, true), DType::F32),
                "{family:?} on a V100"
            );
            assert!(
                !kernels_exist(family, gpu(9, false), DType::F32),
                "{family:?} switched off"
            );
            assert!(
                kernels_exist(family, gpu(8, true), DType::F32),
                "{family:?} on an A100"
            );
        }
        assert!(!kernels_exist(Family::Optimizer, gpu(9, true), DType::BF16));
        assert!(kernels_exist(Family::Attention, gpu(9, true), DType::BF16));
        assert!(!kernels_exist(Family::Optimizer, Place::Cpu, DType::F32));
        assert!(!kernels_exist(Family::GroupNorm, Place::Cpu, DType::F16));
    }

    /// Only the errors that end a process's use of the GPU get the way-out hint.
    #[test]
    fn sticky_cuda_errors_get_the_way_out() {
        let sticky = "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")";
        assert!(sticky_error_hint(sticky).is_some_and(|h| h.contains("MAGICTAILOR_CUDA_KERNELS=0")));
        assert!(
            sticky_error_hint("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").is_none()
        );
    }

    /// A check compares: a kernel side that is off by 1% is caught.
    #[test]
    fn compare_catches_a_skewed_kernel() {
        let x = input(1, &[4, 6], 1.0, 0.0, &Device::Cpu, DType::F32).unwrap();
        let g = input(2, &[4, 6], 1.0, 0.0, &Device::Cpu, DType::F32).unwrap();
        let c = compare(&[x], &g, |t| {
            let y = t[0].sqr()?;
            match FORCED.with(Cell::get) {
                Some(true) => y.skew(),
                _ => Ok(y),
            }
        })
        .unwrap();
        assert!((c.max_err - 0.01).abs() < 1e-4, "{}", c.max_err);
    }
}
