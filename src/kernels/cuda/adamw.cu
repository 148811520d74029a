// The optimizer step as multi-tensor kernels: squared-gradient sums per group, AdamW, and
// the DS-Bal momentum EMA, each one launch over all trainable tensors (f32).
//
// The host uploads one Segment per tensor. Every tensor is cut into chunks of `chunk`
// elements and block b handles chunk b; `first` (a prefix sum of chunk counts) finds the
// tensor of a chunk by binary search.
//
// The arithmetic rounds exactly as candle's composed ops on the CPU (optim.rs, ds_bal.rs):
// each op is one rounded f32 operation, and `__f*_rn` keeps nvcc from contracting a
// multiply and an add into an FMA, so the fused step gives the fallback's bits.
#include "common.cuh"

constexpr unsigned THREADS = 256;  // per block, at most (adamw.rs launches this many)

// One tensor of a launch, as uploaded: eight 64-bit words.
struct Segment {
  unsigned long long ptr[4];  // f32 buffers, by kernel
  unsigned long long len;     // elements
  unsigned long long first;   // its first chunk
  unsigned long long tag;     // sums: its group; AdamW: 1 if its gradient is clipped
  unsigned long long unused;
};

// The segment of chunk c: the last one starting at or before c (empty ones start where
// the next one does, so they are never picked).
__device__ __forceinline__ unsigned segment_of(const Segment *s, unsigned n, unsigned long long c) {
  unsigned lo = 0, hi = n - 1;
  while (lo < hi) {
    const unsigned mid = (lo + hi + 1) / 2;
    if (s[mid].first <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// This block's element range [start, end) of segment s.
struct Range {
  unsigned long long start, end;
};
__device__ __forceinline__ Range chunk_range(const Segment &s, unsigned chunk) {
  const unsigned long long start = (blockIdx.x - s.first) * chunk, end = start + chunk;
  return {start, end < s.len ? end : s.len};
}

__device__ __forceinline__ double block_sum_f64(double v, double *scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

// sums[g] = the sum of x * x (in f64) over the tensors of group g. Each block writes its
// chunk's sum to partial[]; the last block to finish (counted in `done`, zero at launch)
// adds them up in chunk order, so the result does not depend on scheduling.
extern "C" __global__ void __launch_bounds__(THREADS)
    grad_sq_sums(const Segment *segs, unsigned n, unsigned groups, unsigned chunk, double *partial,
                 unsigned *done, double *sums) {
  __shared__ double scratch[32];
  __shared__ bool last;
  const Segment s = segs[segment_of(segs, n, blockIdx.x)];
  const float *g = reinterpret_cast<const float *>(s.ptr[0]);
  const Range r = chunk_range(s, chunk);
  double acc = 0.0;
  for (unsigned long long i = r.start + threadIdx.x; i < r.end; i += blockDim.x) {
    const double x = g[i];
    acc += x * x;  // exact: an f32 square fits in an f64
  }
  acc = block_sum_f64(acc, scratch);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
    __threadfence();  // the sum is visible before the count says so
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) __threadfence();  // acquire: the other blocks' sums are read after the count
  }
  __syncthreads();
  if (!last) return;
  const volatile double *all = partial;  // written by other blocks: not through L1
  for (unsigned grp = 0; grp < groups; grp++) {
    double t = 0.0;
    for (unsigned c = threadIdx.x; c < gridDim.x; c += blockDim.x)
      if (segs[segment_of(segs, n, c)].tag == grp) t += all[c];
    t = block_sum_f64(t, scratch);
    if (threadIdx.x == 0) sums[grp] = t;
  }
}
MT_KERNEL(grad_sq_sums, THREADS)

// candle's `x * mul + add` on a scalar operand, rounded as its CPU kernel rounds it.
__device__ __forceinline__ float affine(float x, float mul, float add) {
  return __fadd_rn(__fmul_rn(x, mul), add);
}

// One AdamW step on segments (p, g, m, v), in optim.rs's op order:
//   g = g * coef (clipped tensors only); m = m * b1 + g * (1 - b1);
//   v = v * b2 + g^2 * (1 - b2); update = (m * inv_bc1) / (sqrt(v * inv_bc2) + eps);
//   p = p * (1 - lr * wd) - update * lr.
extern "C" __global__ void __launch_bounds__(THREADS)
    adamw_step(const Segment *segs, unsigned n, unsigned chunk, float coef, float b1, float omb1,
               float b2, float omb2, float inv_bc1, float inv_bc2, float eps, float decay, float lr) {
  const Segment s = segs[segment_of(segs, n, blockIdx.x)];
  float *p = reinterpret_cast<float *>(s.ptr[0]);
  const float *g = reinterpret_cast<const float *>(s.ptr[1]);
  float *m = reinterpret_cast<float *>(s.ptr[2]);
  float *v = reinterpret_cast<float *>(s.ptr[3]);
  const Range r = chunk_range(s, chunk);
  for (unsigned long long i = r.start + threadIdx.x; i < r.end; i += blockDim.x) {
    float gi = g[i];
    if (s.tag) gi = affine(gi, coef, 0.0f);
    const float mi = __fadd_rn(affine(m[i], b1, 0.0f), affine(gi, omb1, 0.0f));
    const float vi = __fadd_rn(affine(v[i], b2, 0.0f), affine(__fmul_rn(gi, gi), omb2, 0.0f));
    const float denom = affine(__fsqrt_rn(affine(vi, inv_bc2, 0.0f)), 1.0f, eps);
    const float update = __fdiv_rn(affine(mi, inv_bc1, 0.0f), denom);
    p[i] = __fsub_rn(affine(p[i], decay, 0.0f), affine(update, lr, 0.0f));
    m[i] = mi;
    v[i] = vi;
  }
}
MT_KERNEL(adamw_step, THREADS)

// The momentum EMA on segments (m, theta), as ds_bal.rs: m = m * beta + theta * (1 - beta).
extern "C" __global__ void __launch_bounds__(THREADS)
    ema_update(const Segment *segs, unsigned n, unsigned chunk, float beta, float omb) {
  const Segment s = segs[segment_of(segs, n, blockIdx.x)];
  float *m = reinterpret_cast<float *>(s.ptr[0]);
  const float *theta = reinterpret_cast<const float *>(s.ptr[1]);
  const Range r = chunk_range(s, chunk);
  for (unsigned long long i = r.start + threadIdx.x; i < r.end; i += blockDim.x)
    m[i] = __fadd_rn(affine(m[i], beta, 0.0f), affine(theta[i], omb, 0.0f));
}
MT_KERNEL(ema_update, THREADS)
