// CPU emulation of the CUDA C++ subset our kernels use, so that every kernel's indexing,
// synchronization and arithmetic is tested by `cargo test` on machines without a GPU.
// Blocks run one after another; the threads of a block run as OS threads, so
// `__syncthreads`, warp shuffles and shared memory behave as on a GPU (shared memory is
// `static`, hence one block at a time). The launch rules (threads, registers, static plus
// dynamic shared memory) are checked on the Rust side (emu.rs) against the build's
// resource report. Not emulated: timing, occupancy, bank conflicts. wmma fragments hold the whole tile in every lane.
//
// Force-included (`-include emu.h`) before each .cu file when build.rs compiles the kernels
// with the host C++ compiler; nvcc never sees it.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define MT_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace mt_emu {
struct Block;
extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local Block *block;
const dim3 &block_dim();
const dim3 &grid_dim();
void sync_block();
void sync_warp();
// This lane's 8-byte slot in its warp's exchange area, and another lane's.
uint64_t &exchange_slot();
uint64_t exchange_read(unsigned lane);
unsigned lane_id();
unsigned warp_size_of_this_warp();
unsigned char *dynamic_shared();
// Records a broken CUDA rule (the first one per launch); the launch then fails with it.
void fault(const char *what);

template <class T> T shuffle(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  exchange_slot() = bits;
  sync_warp();
  if (src_lane >= warp_size_of_this_warp()) src_lane = lane_id();
  bits = exchange_read(src_lane);
  sync_warp();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
}  // namespace mt_emu

#define threadIdx (mt_emu::thread_idx)
#define blockIdx (mt_emu::block_idx)
#define blockDim (mt_emu::block_dim())
#define gridDim (mt_emu::grid_dim())
#define warpSize 32

inline void __syncthreads() { mt_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { mt_emu::sync_warp(); }

template <class T> T __shfl_sync(unsigned, T v, int src, int width = 32) {
  unsigned lane = mt_emu::lane_id();
  return mt_emu::shuffle(v, (lane / width) * width + unsigned(src) % width);
}
template <class T> T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  unsigned lane = mt_emu::lane_id();
  unsigned src = lane ^ unsigned(mask);
  if (src / width != lane / width) src = lane;
  return mt_emu::shuffle(v, src);
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned lane = mt_emu::lane_id();
  unsigned src = (lane % width) + delta < unsigned(width) ? lane + delta : lane;
  return mt_emu::shuffle(v, src);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned lane = mt_emu::lane_id();
  unsigned src = (lane % width) >= delta ? lane - delta : lane;
  return mt_emu::shuffle(v, src);
}

template <class T> T atomicAdd(T *p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline float atomicMax(float *, float) = delete;  // not a CUDA function either

// Device math: the host's libm stands in for CUDA's (including the fast intrinsics).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return std::min(std::max(x, 0.0f), 1.0f); }
// Correctly rounded single operations, never contracted into an FMA (x86-64 hosts have
// none without -march; adamw.cu relies on this to round as candle's CPU ops round).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
using std::max;
using std::min;

// 16-bit floats: storage types with round-to-nearest-even conversions, as cuda_bf16.h
// and cuda_fp16.h convert.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half(float f) {
  _Float16 v = _Float16(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}

// Tensor-core tiles (mma.h's wmma API). Every lane holds, loads and multiplies the whole
// tile; stores are split over the lanes and followed by a warp barrier.
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> constexpr int tile_rows() {
  return std::is_same_v<Use, matrix_b> ? K : M;
}
template <class Use, int M, int N, int K> constexpr int tile_cols() {
  return std::is_same_v<Use, matrix_a> ? K : N;
}

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = tile_rows<Use, M, N, K>();
  static constexpr int cols = tile_cols<Use, M, N, K>();
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // logical row-major tile
};

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }

// What the hardware requires of a tile's memory: a 256-bit aligned address and a leading
// dimension that is a multiple of 16 bytes.
template <class T> void check_tile(const T *p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) mt_emu::fault("wmma tile address not 32-byte aligned");
  if (ldm * sizeof(T) % 16 != 0) mt_emu::fault("wmma ldm not a multiple of 16 bytes");
}

template <class F, class T> void fill_fragment(F &f, T v) {
  for (auto &e : f.x) e = v;
}
template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const T *p, unsigned ldm) {
  using Fr = fragment<Use, M, N, K, T, L>;
  check_tile(p, ldm);
  constexpr bool col = std::is_same_v<L, col_major>;
  for (int r = 0; r < Fr::rows; r++)
    for (int c = 0; c < Fr::cols; c++) f.x[r * Fr::cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
  mt_emu::sync_warp();  // every lane has read before anyone overwrites the source
}
template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const T *p, unsigned ldm, layout_t l) {
  check_tile(p, ldm);
  for (int r = 0; r < M; r++)
    for (int c = 0; c < N; c++) f.x[r * N + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  mt_emu::sync_warp();
}
template <int M, int N, int K, class T>
void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm, layout_t l) {
  check_tile(p, ldm);
  for (int i = int(mt_emu::lane_id()); i < M * N; i += 32) {
    int r = i / N, c = i % N;
    (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[i];
  }
  mt_emu::sync_warp();
}
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TC> &d, const fragment<matrix_a, M, N, K, TA, LA> &a,
              const fragment<matrix_b, M, N, K, TB, LB> &b, const fragment<accumulator, M, N, K, TC> &c) {
  TC out[M * N];
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; k++) s += to_float(a.x[m * K + k]) * to_float(b.x[k * N + n]);
      out[m * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace nvcuda::wmma

// Kernel registry: MT_KERNEL(name, threads) after an `extern "C" __global__` kernel makes it
// launchable by name from Rust tests (mt_emu_launch in emu.cpp), with `threads` its
// __launch_bounds__.
namespace mt_emu {
using Trampoline = void (*)(void *kernel, void **args);
void register_kernel(const char *name, void *kernel, Trampoline t, unsigned arity, unsigned threads);

template <class... A, size_t... I>
void call_with(void (*k)(A...), void **args, std::index_sequence<I...>) {
  k(*static_cast<std::remove_reference_t<A> *>(args[I])...);
}
template <class... A> struct Registrar {
  Registrar(const char *name, void (*k)(A...), unsigned threads) {
    register_kernel(name, reinterpret_cast<void *>(k), &trampoline, sizeof...(A), threads);
  }
  static void trampoline(void *k, void **args) {
    call_with(reinterpret_cast<void (*)(A...)>(k), args, std::index_sequence_for<A...>{});
  }
};
template <class... A> Registrar(const char *, void (*)(A...), unsigned) -> Registrar<A...>;
}  // namespace mt_emu

#define MT_KERNEL(name, threads) static mt_emu::Registrar mt_registrar_##name(#name, &name, threads);
