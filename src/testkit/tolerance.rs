//! How far apart two tensors are, for the tests' tolerances: the largest absolute
//! difference and the largest difference relative to the largest reference value.

use candle_core::{DType, Tensor};

/// Largest |x| over all elements of `t` taken in `dtype` (F32 or F64), in f64.
fn max_abs_in(t: &Tensor, dtype: DType) -> f64 {
    let m = t
        .to_dtype(dtype)
        .and_then(|t| t.abs()?.flatten_all()?.max(0));
    m.and_then(|m| m.to_dtype(DType::F64)?.to_scalar::<f64>())
        .expect("max |x|")
}

/// Largest |x| over all elements, in f32 (to show a difference is small relative to the
/// values).
pub fn max_abs(t: &Tensor) -> f32 {
    max_abs_in(t, DType::F32) as f32
}

/// Largest |a - b| over all elements, both taken in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    max_abs(&(f32(a) - f32(b)).expect("a - b"))
}

/// max |a - b| / max |b|, in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b)
}

/// max |a - b| / max |b| in f64 (1e-30 where b is all zeros), for comparisons of f64
/// results down to rounding.
pub fn rel_err_f64(a: &Tensor, b: &Tensor) -> f64 {
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
    let diff = (f64(a) - f64(b)).expect("a - b");
    max_abs_in(&diff, DType::F64) / max_abs_in(b, DType::F64).max(1e-30)
}
