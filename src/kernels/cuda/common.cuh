// Helpers every kernel shares: 16-bit float conversions, warp and block reductions, and
// dynamic shared memory. Statistics are always accumulated in f32.
#pragma once
#ifndef MT_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), returned to
// every thread. `scratch` holds 32 floats of shared memory; it is reusable afterwards.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// Shared memory sized at launch, viewed as `T`.
#ifdef MT_EMU
#define MT_DYNAMIC_SHARED(T, name) T *name = reinterpret_cast<T *>(mt_emu::dynamic_shared())
#else
#define MT_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(128) unsigned char mt_smem[]; \
  T *name = reinterpret_cast<T *>(mt_smem)
#define MT_KERNEL(name, threads)
#endif

// One kernel per storage type, with C names the Rust side looks up. With
//   #define GEGLU_PARAMS(T) (const T *x, T *y, unsigned rows, unsigned inner)
//   MT_TYPED(geglu_fwd, 256, GEGLU_PARAMS, (x, y, rows, inner))
// the device template geglu_fwd<T> becomes kernels geglu_fwd_f32, _bf16 and _f16, each
// bounded to 256 threads per block: ptxas then keeps registers within what 256 threads
// may have, and the launchers (and the emulator) refuse larger blocks.
#define MT_TYPED_ONE(name, suffix, T, threads, params, args)                        \
  extern "C" __global__ void __launch_bounds__(threads) name##_##suffix params(T) { \
    name<T> args;                                                                    \
  }                                                                                  \
  MT_KERNEL(name##_##suffix, threads)
#define MT_TYPED(name, threads, params, args)               \
  MT_TYPED_ONE(name, f32, float, threads, params, args)     \
  MT_TYPED_ONE(name, bf16, bf16, threads, params, args)     \
  MT_TYPED_ONE(name, f16, f16, threads, params, args)
