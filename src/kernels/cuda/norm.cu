// GroupNorm (+ SiLU) over x[b, c, hw] and LayerNorm over rows, forward and backward, with
// frozen affine parameters (backward gives dL/dx only). Statistics are two-pass in f32 and
// recomputed in backward from x, as the CPU kernels do; every sum is reduced in a fixed
// order (no atomics), so results are bitwise reproducible.
//
// GroupNorm: one block per (batch, group). A group is contiguous, at most ~40960 elements
// in SD 2.1 (80 KB in bf16), and the whole tensor fits in the H100's 50 MB L2, so the
// later passes over a group read from L2. Training's 6 x 32 groups fill the 132 SMs in one
// wave (up to two blocks per SM) from a single launch, where splitting groups over blocks
// would need extra launches to combine the partial sums deterministically.
// LayerNorm: one warp per row (320..1280 elements), eight rows per block.
#include "common.cuh"

// 16 bytes of T, for vector loads and stores.
template <class T> struct alignas(16) Pack {
  static constexpr unsigned N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ bool aligned16(const void *p) { return reinterpret_cast<size_t>(p) % 16 == 0; }

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// A compile-time element count, so that loops over a pack unroll into registers.
template <unsigned M> struct Count {
  __device__ constexpr operator unsigned() const { return M; }
};

// p[i, i + M) as floats: one vector load for a whole pack (p + i then 16-byte aligned).
template <class T, unsigned M> __device__ __forceinline__ void load(const T *p, size_t i, Count<M>, float *v) {
  if constexpr (M == Pack<T>::N) {
    const Pack<T> a = *reinterpret_cast<const Pack<T> *>(p + i);
#pragma unroll
    for (unsigned j = 0; j < M; j++) v[j] = to_f32(a.v[j]);
  } else {
#pragma unroll
    for (unsigned j = 0; j < M; j++) v[j] = to_f32(p[i + j]);
  }
}

template <class T, unsigned M> __device__ __forceinline__ void store(T *p, size_t i, Count<M>, const float *v) {
  if constexpr (M == Pack<T>::N) {
    Pack<T> a;
#pragma unroll
    for (unsigned j = 0; j < M; j++) a.v[j] = from_f32<T>(v[j]);
    *reinterpret_cast<Pack<T> *>(p + i) = a;
  } else {
#pragma unroll
    for (unsigned j = 0; j < M; j++) p[i + j] = from_f32<T>(v[j]);
  }
}

template <class T, unsigned M, class F>
__device__ __forceinline__ void visit_by(const T *x, const T *dy, T *out, size_t n, unsigned first, unsigned step,
                                         Count<M> m, F f) {
  float v[M], d[M];
  for (size_t i = size_t(first) * M; i < n; i += size_t(step) * M) {
    load(x, i, m, v);
    if (dy) load(dy, i, m, d);
    f(i, v, d, m);
    if (out) store(out, i, m, v);
  }
}

// Visits the elements of [0, n) this thread owns (from `first` with stride `step`), m at a
// time: f(i, v, d, m) sees v = x[i, i + m) and d = dy[i, i + m) (when dy is given) as floats
// and may rewrite v, which is then stored to out (when given). m is a whole pack when `vec`
// (n a multiple of the pack, every pointer 16-byte aligned), else 1.
template <class T, class F>
__device__ __forceinline__ void visit(const T *x, const T *dy, T *out, size_t n, bool vec, unsigned first,
                                      unsigned step, F f) {
  if (vec)
    visit_by(x, dy, out, n, first, step, Count<Pack<T>::N>(), f);
  else
    visit_by(x, dy, out, n, first, step, Count<1>(), f);
}

struct Stats {
  float mean, rstd;
};

// Mean and 1 / sqrt(var + eps) of x[0, n), `sum` reducing over the threads sharing the row.
template <class T, class Sum>
__device__ __forceinline__ Stats stats(const T *x, size_t n, bool vec, float eps, unsigned first, unsigned step,
                                       Sum sum) {
  float s = 0.0f;
  visit(x, (const T *)nullptr, (T *)nullptr, n, vec, first, step, [&](size_t, float *v, float *, auto m) {
    for (unsigned j = 0; j < m; j++) s += v[j];
  });
  const float mean = sum(s) / float(n);
  float q = 0.0f;
  visit(x, (const T *)nullptr, (T *)nullptr, n, vec, first, step, [&](size_t, float *v, float *, auto m) {
    for (unsigned j = 0; j < m; j++) q += (v[j] - mean) * (v[j] - mean);
  });
  return {mean, rsqrtf(sum(q) / float(n) + eps)};
}

// dL/dxhat from dL/dy at one element: through SiLU(z = xhat * gamma + beta) when fused.
__device__ __forceinline__ float grad_xhat(float xhat, float dy, float gm, float bt, unsigned silu) {
  if (silu) {
    const float z = xhat * gm + bt, s = sigmoid(z);
    dy *= s * (1.0f + z * (1.0f - s));
  }
  return dy * gm;
}

// The (batch, group) block's slice: its first channel and element count; x, y offset to it.
struct Group {
  unsigned c0;
  size_t n;
};
__device__ __forceinline__ Group group_of(unsigned channels, unsigned hw, unsigned groups) {
  const unsigned cpg = channels / groups;
  return {blockIdx.x % groups * cpg, size_t(cpg) * hw};
}

template <class T>
__device__ void gn_fwd(const T *__restrict__ x, const T *__restrict__ gamma, const T *__restrict__ beta,
                       T *__restrict__ y, unsigned channels, unsigned hw, unsigned groups, float eps,
                       unsigned silu) {
  __shared__ float scratch[32];
  const Group g = group_of(channels, hw, groups);
  x += blockIdx.x * g.n;
  y += blockIdx.x * g.n;
  // A pack never straddles two channels: hw is a multiple of it.
  const bool vec = hw % Pack<T>::N == 0 && aligned16(x) && aligned16(y);
  const Stats st = stats(x, g.n, vec, eps, threadIdx.x, blockDim.x, [&](float v) { return block_sum(v, scratch); });
  visit(x, (const T *)nullptr, y, g.n, vec, threadIdx.x, blockDim.x, [&](size_t i, float *v, float *, auto m) {
    const unsigned c = g.c0 + unsigned(i / hw);
    const float a = to_f32(gamma[c]) * st.rstd, b = to_f32(beta[c]) - a * st.mean;
    for (unsigned j = 0; j < m; j++) {
      const float z = v[j] * a + b;
      v[j] = silu ? z * sigmoid(z) : z;
    }
  });
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over the group.
template <class T>
__device__ void gn_bwd(const T *__restrict__ x, const T *__restrict__ dy, const T *__restrict__ gamma,
                       const T *__restrict__ beta, T *__restrict__ dx, unsigned channels, unsigned hw,
                       unsigned groups, float eps, unsigned silu) {
  __shared__ float scratch[32];
  const Group g = group_of(channels, hw, groups);
  x += blockIdx.x * g.n;
  dy += blockIdx.x * g.n;
  dx += blockIdx.x * g.n;
  const bool vec = hw % Pack<T>::N == 0 && aligned16(x) && aligned16(dy) && aligned16(dx);
  auto sum = [&](float v) { return block_sum(v, scratch); };
  const Stats st = stats(x, g.n, vec, eps, threadIdx.x, blockDim.x, sum);
  // Runs f(xhat, dxhat) at every element of the thread's packs, keeping what f returns.
  auto each = [&](T *out, auto f) {
    visit(x, dy, out, g.n, vec, threadIdx.x, blockDim.x, [&](size_t i, float *v, float *d, auto m) {
      const unsigned c = g.c0 + unsigned(i / hw);
      const float gm = to_f32(gamma[c]), bt = to_f32(beta[c]);
      for (unsigned j = 0; j < m; j++) {
        const float xhat = (v[j] - st.mean) * st.rstd;
        v[j] = f(xhat, grad_xhat(xhat, d[j], gm, bt, silu));
      }
    });
  };
  float s1 = 0.0f, s2 = 0.0f;
  each((T *)nullptr, [&](float xhat, float dh) {
    s1 += dh;
    s2 += dh * xhat;
    return 0.0f;
  });
  const float m1 = sum(s1) / float(g.n), m2 = sum(s2) / float(g.n);
  each(dx, [&](float xhat, float dh) { return st.rstd * (dh - m1 - xhat * m2); });
}

constexpr unsigned LN_ROWS = 8;  // rows (warps) per LayerNorm block

// This warp's row, or false past the end.
__device__ __forceinline__ bool ln_row(unsigned rows, unsigned *row) {
  *row = blockIdx.x * LN_ROWS + threadIdx.x / 32;
  return *row < rows;
}

template <class T>
__device__ void ln_fwd(const T *__restrict__ x, const T *__restrict__ gamma, const T *__restrict__ beta,
                       T *__restrict__ y, unsigned rows, unsigned n, float eps) {
  unsigned row;
  if (!ln_row(rows, &row)) return;  // the whole warp: no block barriers follow
  x += size_t(row) * n;
  y += size_t(row) * n;
  const unsigned lane = threadIdx.x % 32;
  const bool vec = n % Pack<T>::N == 0 && aligned16(x) && aligned16(y) && aligned16(gamma) && aligned16(beta);
  const Stats st = stats(x, n, vec, eps, lane, 32, [](float v) { return warp_sum(v); });
  visit(x, (const T *)nullptr, y, n, vec, lane, 32, [&](size_t i, float *v, float *, auto m) {
    float gm[Pack<T>::N], bt[Pack<T>::N];
    load(gamma, i, m, gm);
    load(beta, i, m, bt);
    for (unsigned j = 0; j < m; j++) v[j] = (v[j] - st.mean) * st.rstd * gm[j] + bt[j];
  });
}

template <class T>
__device__ void ln_bwd(const T *__restrict__ x, const T *__restrict__ dy, const T *__restrict__ gamma,
                       T *__restrict__ dx, unsigned rows, unsigned n, float eps) {
  unsigned row;
  if (!ln_row(rows, &row)) return;
  x += size_t(row) * n;
  dy += size_t(row) * n;
  dx += size_t(row) * n;
  const unsigned lane = threadIdx.x % 32;
  const bool vec = n % Pack<T>::N == 0 && aligned16(x) && aligned16(dy) && aligned16(dx) && aligned16(gamma);
  const Stats st = stats(x, n, vec, eps, lane, 32, [](float v) { return warp_sum(v); });
  auto each = [&](T *out, auto f) {
    visit(x, dy, out, n, vec, lane, 32, [&](size_t i, float *v, float *d, auto m) {
      float gm[Pack<T>::N];
      load(gamma, i, m, gm);
      for (unsigned j = 0; j < m; j++) v[j] = f((v[j] - st.mean) * st.rstd, d[j] * gm[j]);
    });
  };
  float s1 = 0.0f, s2 = 0.0f;
  each((T *)nullptr, [&](float xhat, float dh) {
    s1 += dh;
    s2 += dh * xhat;
    return 0.0f;
  });
  const float m1 = warp_sum(s1) / float(n), m2 = warp_sum(s2) / float(n);
  each(dx, [&](float xhat, float dh) { return st.rstd * (dh - m1 - xhat * m2); });
}

#define GN_FWD(T) \
  (const T *x, const T *gamma, const T *beta, T *y, unsigned channels, unsigned hw, unsigned groups, float eps, \
   unsigned silu)
MT_TYPED(gn_fwd, 1024, GN_FWD, (x, gamma, beta, y, channels, hw, groups, eps, silu))
#define GN_BWD(T)                                                                                             \
  (const T *x, const T *dy, const T *gamma, const T *beta, T *dx, unsigned channels, unsigned hw, unsigned groups, \
   float eps, unsigned silu)
MT_TYPED(gn_bwd, 1024, GN_BWD, (x, dy, gamma, beta, dx, channels, hw, groups, eps, silu))
#define LN_FWD(T) (const T *x, const T *gamma, const T *beta, T *y, unsigned rows, unsigned n, float eps)
MT_TYPED(ln_fwd, 32 * LN_ROWS, LN_FWD, (x, gamma, beta, y, rows, n, eps))
#define LN_BWD(T) (const T *x, const T *dy, const T *gamma, T *dx, unsigned rows, unsigned n, float eps)
MT_TYPED(ln_bwd, 32 * LN_ROWS, LN_BWD, (x, dy, gamma, dx, rows, n, eps))
