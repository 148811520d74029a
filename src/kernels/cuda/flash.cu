// Flash attention, forward and backward, on token-major tensors: q, o, dO [b, n, heads*d]
// and k, v [b, m, heads*d], element (b, token, h, c) at ((b*tokens + token)*heads + h)*d + c;
// lse and delta are f32 [b*heads, n]. One block of 4 warps per (tile, b*heads); scores
// never leave shared memory, and backward recomputes them from the log-sum-exp.
//
// Every tile product goes through tile_mma: tensor cores (wmma 16x16x16, f32 accumulators)
// for bf16/f16, FMA on CUDA cores for f32. Accumulators (O, dQ, dK, dV) live in shared
// memory as f32 because a wmma fragment's element-to-row mapping is opaque, and softmax
// needs rows. Head dims are zero-padded to a multiple of 16 (dp) inside the tiles;
// partial tiles are zero-padded and masked. No atomics: every output element is written
// by exactly one block, so results are deterministic.
#include <type_traits>

#include "common.cuh"

constexpr unsigned BQ = 64;  // query rows per tile (forward, dQ)
constexpr unsigned BK = 64;  // key rows per tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr unsigned MAX_THREADS = 256;  // per tiled block: flash.rs launches 128 or 256
constexpr unsigned DELTA_ROWS = 8;     // rows (warps) per flash_delta block

// dK/dV keeps K, V and two f32 accumulators resident; f32 halves its query tile so that
// head dim 128 stays under the 227 KB of shared memory.
template <class T> __host__ __device__ constexpr unsigned dkdv_q_tile() { return std::is_same_v<T, float> ? 32 : 64; }

// Row pitches, in elements. The padding staggers rows over shared-memory banks and keeps
// every 16-row tile 32-byte aligned for wmma. flash.rs mirrors these and the layouts.
__device__ __forceinline__ unsigned pad16(unsigned d) { return (d + 15) / 16 * 16; }
__device__ __forceinline__ unsigned in_pitch(unsigned dp) { return dp + 8; }   // T tiles
__device__ __forceinline__ unsigned acc_pitch(unsigned dp) { return dp + 4; }  // f32 accumulators
constexpr unsigned SCORE_PITCH = BK + 4;                                          // f32 scores
constexpr unsigned PROB_PITCH = BK + 8;                                           // T probabilities

// Consecutive arrays of dynamic shared memory, each starting 128-byte aligned.
struct Carve {
  unsigned char *p;
  template <class U> __device__ U *take(unsigned count) {
    U *r = reinterpret_cast<U *>(p);
    p += (size_t(count) * sizeof(U) + 127) / 128 * 128;
    return r;
  }
};

// Probabilities (and dS) as matmul inputs: a T array for wmma; f32 reuses the score array
// in place (each element is read and rewritten by the same thread).
template <class T> __device__ T *prob_tile(Carve &c, float *scores, unsigned rows) {
  if constexpr (std::is_same_v<T, float>) return scores;
  else return c.take<T>(rows * PROB_PITCH);
}
template <class T> __host__ __device__ constexpr unsigned prob_pitch() {
  return std::is_same_v<T, float> ? SCORE_PITCH : PROB_PITCH;
}

struct alignas(16) Chunk {
  unsigned w[4];
};

// rows x dp tile from `rows_valid` token rows at `src` (token stride `stride`), zero beyond
// them and beyond column d. 16-byte loads where rows allow.
template <class T>
__device__ void load_tile(T *dst, unsigned pitch, const T *src, size_t stride, unsigned rows_valid,
                          unsigned rows, unsigned d, unsigned dp) {
  constexpr unsigned V = 16 / sizeof(T);
  if (d % V == 0 && reinterpret_cast<size_t>(src) % 16 == 0) {
    const unsigned chunks = dp / V;
    for (unsigned i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
      const unsigned r = i / chunks, c = i % chunks * V;
      Chunk x = {{0, 0, 0, 0}};
      if (r < rows_valid && c < d) x = *reinterpret_cast<const Chunk *>(src + r * stride + c);
      *reinterpret_cast<Chunk *>(dst + r * pitch + c) = x;
    }
    return;
  }
  for (unsigned i = threadIdx.x; i < rows * dp; i += blockDim.x) {
    const unsigned r = i / dp, c = i % dp;
    dst[r * pitch + c] = r < rows_valid && c < d ? src[r * stride + c] : from_f32<T>(0.0f);
  }
}

__device__ void fill(float *p, unsigned count, float v) {
  for (unsigned i = threadIdx.x; i < count; i += blockDim.x) p[i] = v;
}

// C[R x N] (f32, pitch ldc) = (acc ? C : 0) + A B, with A(i, k) = TA ? A[k*lda + i] :
// A[i*lda + k] and B(k, j) = TB ? B[j*ldb + k] : B[k*ldb + j]. R, N, K multiples of 16.
// The caller synchronizes before and after.
template <bool TA, bool TB>
__device__ void fma_tiles(float *C, unsigned ldc, const float *A, unsigned lda, const float *B,
                          unsigned ldb, unsigned R, unsigned N, unsigned K, bool acc) {
  const unsigned tiles_n = N / 4;
  for (unsigned t = threadIdx.x; t < R / 4 * tiles_n; t += blockDim.x) {
    const unsigned i = t / tiles_n * 4, j = t % tiles_n * 4;
    float c[4][4];
    for (unsigned a = 0; a < 4; a++)
      for (unsigned b = 0; b < 4; b++) c[a][b] = acc ? C[(i + a) * ldc + j + b] : 0.0f;
    for (unsigned k = 0; k < K; k++) {
      float av[4], bv[4];
      for (unsigned a = 0; a < 4; a++) av[a] = TA ? A[k * lda + i + a] : A[(i + a) * lda + k];
      for (unsigned b = 0; b < 4; b++) bv[b] = TB ? B[(j + b) * ldb + k] : B[k * ldb + j + b];
      for (unsigned a = 0; a < 4; a++)
        for (unsigned b = 0; b < 4; b++) c[a][b] = fmaf(av[a], bv[b], c[a][b]);
    }
    for (unsigned a = 0; a < 4; a++)
      for (unsigned b = 0; b < 4; b++) C[(i + a) * ldc + j + b] = c[a][b];
  }
}

// fma_tiles on tensor cores: each warp owns 16x16 output tiles.
template <bool TA, bool TB, class T>
__device__ void wmma_tiles(float *C, unsigned ldc, const T *A, unsigned lda, const T *B, unsigned ldb,
                           unsigned R, unsigned N, unsigned K, bool acc) {
  using namespace nvcuda;
  using LA = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
  using LB = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
  const unsigned warp = threadIdx.x / 32, warps = blockDim.x / 32, tiles_n = N / 16;
  for (unsigned t = warp; t < R / 16 * tiles_n; t += warps) {
    const unsigned i = t / tiles_n * 16, j = t % tiles_n * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if (acc) wmma::load_matrix_sync(c, C + i * ldc + j, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(c, 0.0f);
    for (unsigned k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, TA ? A + k * lda + i : A + i * lda + k, lda);
      wmma::load_matrix_sync(b, TB ? B + j * ldb + k : B + k * ldb + j, ldb);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(C + i * ldc + j, c, ldc, wmma::mem_row_major);
  }
}

template <bool TA, bool TB, class T>
__device__ __forceinline__ void tile_mma(float *C, unsigned ldc, const T *A, unsigned lda, const T *B,
                                         unsigned ldb, unsigned R, unsigned N, unsigned K, bool acc) {
  if constexpr (std::is_same_v<T, float>) fma_tiles<TA, TB>(C, ldc, A, lda, B, ldb, R, N, K, acc);
  else wmma_tiles<TA, TB, T>(C, ldc, A, lda, B, ldb, R, N, K, acc);
}

// Where (b, h) starts in a token-major tensor of `tokens` tokens.
template <class T>
__device__ __forceinline__ T *head_base(T *p, unsigned bh, unsigned heads, unsigned tokens, unsigned d) {
  const unsigned b = bh / heads, h = bh % heads;
  return p + (size_t(b) * tokens * heads + h) * d;
}

// ---------------------------------------------------------------------------------------
// Forward: one block per (64 queries, b*heads), looping over key tiles with the online
// softmax. Rows are in log2 units (scores times scale*log2e) until the log-sum-exp.

// Per row (a warp per row): P = exp2(s - new max) masked to `kn` keys, the running max and
// sum updated, and the row's accumulator rescaled.
template <class T>
__device__ void online_softmax(const float *s, T *p, float *o_acc, unsigned ldo, unsigned dp,
                               float *row_max, float *row_sum, unsigned kn, float scale2) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (unsigned r = warp; r < BQ; r += warps) {
    const float old_max = row_max[r], old_sum = row_sum[r];
    float x[BK / 32], mx = -INFINITY;
    for (unsigned t = 0; t < BK / 32; t++) {
      const unsigned c = lane + 32 * t;
      x[t] = c < kn ? s[r * SCORE_PITCH + c] * scale2 : -INFINITY;
      mx = fmaxf(mx, x[t]);
    }
    const float new_max = fmaxf(old_max, warp_max(mx)), alpha = exp2f(old_max - new_max);
    float sum = 0.0f;
    for (unsigned t = 0; t < BK / 32; t++) {
      const float e = exp2f(x[t] - new_max);
      sum += e;
      p[r * prob_pitch<T>() + lane + 32 * t] = from_f32<T>(e);
    }
    sum = warp_sum(sum);
    for (unsigned c = lane; c < dp; c += 32) o_acc[r * ldo + c] *= alpha;
    // Every lane has read the row's old max before lane 0 overwrites it: a shuffle orders
    // no memory (compute-sanitizer's racecheck flagged this read/write pair on an H200).
    __syncwarp();
    if (lane == 0) {
      row_max[r] = new_max;
      row_sum[r] = old_sum * alpha + sum;
    }
  }
}

template <class T>
__device__ void flash_fwd(const T *q, const T *k, const T *v, T *o, float *lse, unsigned heads, unsigned n,
                          unsigned m, unsigned d, float scale) {
  const unsigned dp = pad16(d), ldt = in_pitch(dp), ldo = acc_pitch(dp), bh = blockIdx.y;
  const unsigned q0 = blockIdx.x * BQ, qn = min(BQ, n - q0);
  const size_t stride = size_t(heads) * d;
  q = head_base(q, bh, heads, n, d) + q0 * stride;
  o = head_base(o, bh, heads, n, d) + q0 * stride;
  k = head_base(k, bh, heads, m, d);
  v = head_base(v, bh, heads, m, d);

  MT_DYNAMIC_SHARED(unsigned char, smem);
  Carve cv{smem};
  T *qs = cv.take<T>(BQ * ldt), *ks = cv.take<T>(BK * ldt), *vs = cv.take<T>(BK * ldt);
  float *s = cv.take<float>(BQ * SCORE_PITCH);
  T *p = prob_tile<T>(cv, s, BQ);
  float *o_acc = cv.take<float>(BQ * ldo), *row_max = cv.take<float>(BQ), *row_sum = cv.take<float>(BQ);

  load_tile(qs, ldt, q, stride, qn, BQ, d, dp);
  fill(o_acc, BQ * ldo, 0.0f);
  fill(row_max, BQ, -INFINITY);
  fill(row_sum, BQ, 0.0f);
  const float scale2 = scale * LOG2E;
  for (unsigned k0 = 0; k0 < m; k0 += BK) {
    const unsigned kn = min(BK, m - k0);
    __syncthreads();  // the previous tile's readers of ks, vs and p are done
    load_tile(ks, ldt, k + k0 * stride, stride, kn, BK, d, dp);
    load_tile(vs, ldt, v + k0 * stride, stride, kn, BK, d, dp);
    __syncthreads();
    tile_mma<false, true>(s, SCORE_PITCH, qs, ldt, ks, ldt, BQ, BK, dp, false);
    __syncthreads();
    online_softmax(s, p, o_acc, ldo, dp, row_max, row_sum, kn, scale2);
    __syncthreads();
    tile_mma<false, false>(o_acc, ldo, p, prob_pitch<T>(), vs, ldt, BQ, dp, BK, true);
  }
  __syncthreads();
  for (unsigned i = threadIdx.x; i < qn * d; i += blockDim.x) {
    const unsigned r = i / d, c = i % d;
    o[r * stride + c] = from_f32<T>(o_acc[r * ldo + c] / row_sum[r]);
  }
  for (unsigned r = threadIdx.x; r < qn; r += blockDim.x)
    lse[size_t(bh) * n + q0 + r] = row_max[r] / LOG2E + logf(row_sum[r]);
}

// ---------------------------------------------------------------------------------------
// Backward. delta_i = <dO_i, O_i>; with P = exp(scale q k^T - lse) and dS = P (dP - delta),
// dP = dO V^T: dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K.

// One warp per (b, token, head) row; `rows` = b*n*heads.
template <class T>
__device__ void flash_delta(const T *o, const T *g, float *delta, unsigned rows, unsigned heads, unsigned n,
                            unsigned d) {
  const unsigned lane = threadIdx.x % 32, row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps
  float acc = 0.0f;
  for (unsigned c = lane; c < d; c += 32) acc += to_f32(o[size_t(row) * d + c]) * to_f32(g[size_t(row) * d + c]);
  acc = warp_sum(acc);
  const unsigned h = row % heads, token = row / heads % n, b = row / heads / n;
  if (lane == 0) delta[(size_t(b) * heads + h) * n + token] = acc;
}

// Row statistics of query rows q0.. (qn valid) in log2 units, zero for padding rows.
__device__ void load_stats(float *lse2, float *dl, const float *lse, const float *delta, unsigned rows,
                           unsigned qn) {
  for (unsigned r = threadIdx.x; r < rows; r += blockDim.x) {
    lse2[r] = r < qn ? lse[r] * LOG2E : 0.0f;
    dl[r] = r < qn ? delta[r] : 0.0f;
  }
}

// From scores s and dP (rows x BK, f32): P (if wanted) and dS = P (dP - delta), zero outside
// the qn x kn valid block. P and dS may alias s and dp (same element, same thread).
template <class T, bool WANT_P>
__device__ void score_grads(const float *s, const float *dp, T *p, T *ds, const float *lse2, const float *dl,
                            unsigned rows, unsigned qn, unsigned kn, float scale2) {
  for (unsigned i = threadIdx.x; i < rows * BK; i += blockDim.x) {
    const unsigned r = i / BK, c = i % BK;
    const float pv = r < qn && c < kn ? exp2f(s[r * SCORE_PITCH + c] * scale2 - lse2[r]) : 0.0f;
    const float dsv = pv * (dp[r * SCORE_PITCH + c] - dl[r]);
    if (WANT_P) p[r * prob_pitch<T>() + c] = from_f32<T>(pv);
    ds[r * prob_pitch<T>() + c] = from_f32<T>(dsv);
  }
}

// Writes rows x d of an f32 accumulator, times `mul`, to a token-major tensor.
template <class T>
__device__ void store_tile(T *dst, size_t stride, const float *acc, unsigned ldo, unsigned rows, unsigned d,
                           float mul) {
  for (unsigned i = threadIdx.x; i < rows * d; i += blockDim.x) {
    const unsigned r = i / d, c = i % d;
    dst[r * stride + c] = from_f32<T>(acc[r * ldo + c] * mul);
  }
}

// dK, dV: one block per (64 keys, b*heads), looping over query tiles.
template <class T>
__device__ void flash_dkdv(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *delta,
                           T *dk, T *dv, unsigned heads, unsigned n, unsigned m, unsigned d, float scale) {
  constexpr unsigned BQB = dkdv_q_tile<T>();
  const unsigned dp = pad16(d), ldt = in_pitch(dp), ldo = acc_pitch(dp), bh = blockIdx.y;
  const unsigned k0 = blockIdx.x * BK, kn = min(BK, m - k0);
  const size_t stride = size_t(heads) * d;
  q = head_base(q, bh, heads, n, d);
  g = head_base(g, bh, heads, n, d);
  k = head_base(k, bh, heads, m, d) + k0 * stride;
  v = head_base(v, bh, heads, m, d) + k0 * stride;
  lse += size_t(bh) * n;
  delta += size_t(bh) * n;

  MT_DYNAMIC_SHARED(unsigned char, smem);
  Carve cv{smem};
  T *ks = cv.take<T>(BK * ldt), *vs = cv.take<T>(BK * ldt);
  float *dk_acc = cv.take<float>(BK * ldo), *dv_acc = cv.take<float>(BK * ldo);
  T *qs = cv.take<T>(BQB * ldt), *gs = cv.take<T>(BQB * ldt);
  float *s = cv.take<float>(BQB * SCORE_PITCH), *dps = cv.take<float>(BQB * SCORE_PITCH);
  T *p = prob_tile<T>(cv, s, BQB), *ds = prob_tile<T>(cv, dps, BQB);
  float *lse2 = cv.take<float>(BQB), *dl = cv.take<float>(BQB);

  load_tile(ks, ldt, k, stride, kn, BK, d, dp);
  load_tile(vs, ldt, v, stride, kn, BK, d, dp);
  fill(dk_acc, BK * ldo, 0.0f);
  fill(dv_acc, BK * ldo, 0.0f);
  const float scale2 = scale * LOG2E;
  for (unsigned q0 = 0; q0 < n; q0 += BQB) {
    const unsigned qn = min(BQB, n - q0);
    __syncthreads();  // the previous tile's readers of qs, gs, p and ds are done
    load_tile(qs, ldt, q + q0 * stride, stride, qn, BQB, d, dp);
    load_tile(gs, ldt, g + q0 * stride, stride, qn, BQB, d, dp);
    load_stats(lse2, dl, lse + q0, delta + q0, BQB, qn);
    __syncthreads();
    tile_mma<false, true>(s, SCORE_PITCH, qs, ldt, ks, ldt, BQB, BK, dp, false);
    tile_mma<false, true>(dps, SCORE_PITCH, gs, ldt, vs, ldt, BQB, BK, dp, false);
    __syncthreads();
    score_grads<T, true>(s, dps, p, ds, lse2, dl, BQB, qn, kn, scale2);
    __syncthreads();
    tile_mma<true, false>(dv_acc, ldo, p, prob_pitch<T>(), gs, ldt, BK, dp, BQB, true);
    tile_mma<true, false>(dk_acc, ldo, ds, prob_pitch<T>(), qs, ldt, BK, dp, BQB, true);
  }
  __syncthreads();
  store_tile(head_base(dk, bh, heads, m, d) + k0 * stride, stride, dk_acc, ldo, kn, d, scale);
  store_tile(head_base(dv, bh, heads, m, d) + k0 * stride, stride, dv_acc, ldo, kn, d, 1.0f);
}

// dQ: one block per (64 queries, b*heads), looping over key tiles.
template <class T>
__device__ void flash_dq(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *delta,
                         T *dq, unsigned heads, unsigned n, unsigned m, unsigned d, float scale) {
  const unsigned dp = pad16(d), ldt = in_pitch(dp), ldo = acc_pitch(dp), bh = blockIdx.y;
  const unsigned q0 = blockIdx.x * BQ, qn = min(BQ, n - q0);
  const size_t stride = size_t(heads) * d;
  q = head_base(q, bh, heads, n, d) + q0 * stride;
  g = head_base(g, bh, heads, n, d) + q0 * stride;
  dq = head_base(dq, bh, heads, n, d) + q0 * stride;
  k = head_base(k, bh, heads, m, d);
  v = head_base(v, bh, heads, m, d);

  MT_DYNAMIC_SHARED(unsigned char, smem);
  Carve cv{smem};
  T *qs = cv.take<T>(BQ * ldt), *gs = cv.take<T>(BQ * ldt);
  float *dq_acc = cv.take<float>(BQ * ldo);
  T *ks = cv.take<T>(BK * ldt), *vs = cv.take<T>(BK * ldt);
  float *s = cv.take<float>(BQ * SCORE_PITCH), *dps = cv.take<float>(BQ * SCORE_PITCH);
  T *ds = prob_tile<T>(cv, dps, BQ);
  float *lse2 = cv.take<float>(BQ), *dl = cv.take<float>(BQ);

  load_tile(qs, ldt, q, stride, qn, BQ, d, dp);
  load_tile(gs, ldt, g, stride, qn, BQ, d, dp);
  load_stats(lse2, dl, lse + size_t(bh) * n + q0, delta + size_t(bh) * n + q0, BQ, qn);
  fill(dq_acc, BQ * ldo, 0.0f);
  const float scale2 = scale * LOG2E;
  for (unsigned k0 = 0; k0 < m; k0 += BK) {
    const unsigned kn = min(BK, m - k0);
    __syncthreads();  // the previous tile's readers of ks, vs and ds are done
    load_tile(ks, ldt, k + k0 * stride, stride, kn, BK, d, dp);
    load_tile(vs, ldt, v + k0 * stride, stride, kn, BK, d, dp);
    __syncthreads();
    tile_mma<false, true>(s, SCORE_PITCH, qs, ldt, ks, ldt, BQ, BK, dp, false);
    tile_mma<false, true>(dps, SCORE_PITCH, gs, ldt, vs, ldt, BQ, BK, dp, false);
    __syncthreads();
    score_grads<T, false>(s, dps, ds, ds, lse2, dl, BQ, qn, kn, scale2);
    __syncthreads();
    tile_mma<false, false>(dq_acc, ldo, ds, prob_pitch<T>(), ks, ldt, BQ, dp, BK, true);
  }
  __syncthreads();
  store_tile(dq, stride, dq_acc, ldo, qn, d, scale);
}

#define DIMS unsigned heads, unsigned n, unsigned m, unsigned d, float scale
#define FWD_PARAMS(T) (const T *q, const T *k, const T *v, T *o, float *lse, DIMS)
MT_TYPED(flash_fwd, MAX_THREADS, FWD_PARAMS, (q, k, v, o, lse, heads, n, m, d, scale))
#define DELTA_PARAMS(T) (const T *o, const T *g, float *delta, unsigned rows, unsigned heads, unsigned n, unsigned d)
MT_TYPED(flash_delta, 32 * DELTA_ROWS, DELTA_PARAMS, (o, g, delta, rows, heads, n, d))
#define DKDV_PARAMS(T) \
  (const T *q, const T *k, const T *v, const T *g, const float *lse, const float *delta, T *dk, T *dv, DIMS)
MT_TYPED(flash_dkdv, MAX_THREADS, DKDV_PARAMS, (q, k, v, g, lse, delta, dk, dv, heads, n, m, d, scale))
#define DQ_PARAMS(T) (const T *q, const T *k, const T *v, const T *g, const float *lse, const float *delta, T *dq, DIMS)
MT_TYPED(flash_dq, MAX_THREADS, DQ_PARAMS, (q, k, v, g, lse, delta, dq, heads, n, m, d, scale))
