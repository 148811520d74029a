// diffusers' GEGLU, h * gelu_erf(gate) for rows [h | gate], forward and backward.
// Elementwise: one thread per output element, grid-stride.
#include "common.cuh"

__device__ __forceinline__ float gelu_cdf(float g) { return 0.5f * (1.0f + erff(g * 0.70710678f)); }

template <class T>
__device__ void geglu_fwd(const T *__restrict__ x, T *__restrict__ y, unsigned rows, unsigned inner) {
  const size_t n = size_t(rows) * inner;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / inner, c = i % inner;
    const float h = to_f32(x[r * 2 * inner + c]), g = to_f32(x[r * 2 * inner + inner + c]);
    y[i] = from_f32<T>(h * g * gelu_cdf(g));
  }
}

// dx = [dy * gelu(gate) | dy * h * gelu'(gate)]
template <class T>
__device__ void geglu_bwd(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx,
                          unsigned rows, unsigned inner) {
  const size_t n = size_t(rows) * inner;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / inner, c = i % inner, hi = r * 2 * inner + c, gi = hi + inner;
    const float h = to_f32(x[hi]), g = to_f32(x[gi]), d = to_f32(dy[i]);
    const float cdf = gelu_cdf(g), pdf = 0.39894228f * expf(-0.5f * g * g);
    dx[hi] = from_f32<T>(d * g * cdf);
    dx[gi] = from_f32<T>(d * h * (cdf + g * pdf));
  }
}

#define FWD_PARAMS(T) (const T *x, T *y, unsigned rows, unsigned inner)
MT_TYPED(geglu_fwd, 256, FWD_PARAMS, (x, y, rows, inner))
#define BWD_PARAMS(T) (const T *x, const T *dy, T *dx, unsigned rows, unsigned inner)
MT_TYPED(geglu_bwd, 256, BWD_PARAMS, (x, dy, dx, rows, inner))
