// Shared CUDA helpers: storage types, error checks, reductions, vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "afs/error.h"
#include "afs/types.h"

namespace afs::cuda {

#define AFS_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                \
    cudaError_t afs_err_ = (expr);                                                                    \
    if (afs_err_ != cudaSuccess)                                                                      \
      ::afs::throw_error("CUDA error in ", #expr, " (", __FILE__, ":", __LINE__, "): ",                 \
                         cudaGetErrorString(afs_err_));                                               \
  } while (0)

// Device storage type for a host storage tag (afs::bf16 -> __nv_bfloat16, afs::f16 -> __half).
template <class W> struct device_type;
template <> struct device_type<afs::bf16> { using type = __nv_bfloat16; };
template <> struct device_type<afs::f16> { using type = __half; };

__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

// Two packed 16-bit values <-> float2.
template <class T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// K/V pool storage (kv_cache_dtype): the 16-bit weight type, or kv_fp8, e4m3 with unit scale:
// float32 values round to nearest even and saturate at +-448 (cvt.rn.satfinite; the host's
// __nv_cvt_float_to_fp8 with __NV_SATFINITE gives the same bytes), straight from float32.
using kv_fp8 = __nv_fp8_e4m3;
template <class KV>
inline constexpr bool kIsFp8Kv = sizeof(KV) == 1;
// Four floats as four e4m3 bytes, the first in the low byte.
__device__ __forceinline__ uint32_t fp8x4(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | hi << 16;
}
// The four e4m3 bytes of w (the low byte first) as floats: exact, through f16x2.
__device__ __forceinline__ void fp8x4_to_f32(uint32_t w, float* f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const __half2_raw r =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>((w >> (16 * h)) & 0xFFFFu), __NV_E4M3);
    const float2 p = __half22float2(__half2(r));
    f[2 * h] = p.x, f[2 * h + 1] = p.y;
  }
}

// Whether environment variable `name` is set to exactly `value` (the CUDA engines' A/B switches,
// read once when an engine loads).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// Output pair (col, col + 1) of a GEMM row into y, float32 or 16-bit: one 8- or 4-byte store when
// both columns exist and the pair is aligned (`vec`), else each column below N on its own.
template <class Y>
__device__ __forceinline__ void store_pair(Y* dst, float c0, float c1, bool has0, bool has1, bool vec) {
  if constexpr (std::is_same<Y, float>::value) {
    if (has1 && vec) *reinterpret_cast<float2*>(dst) = make_float2(c0, c1);
    else {
      if (has0) dst[0] = c0;
      if (has1) dst[1] = c1;
    }
  } else {
    if (has1 && vec) *reinterpret_cast<uint32_t*>(dst) = pack2<Y>(c0, c1);
    else {
      if (has0) dst[0] = from_f32<Y>(c0);
      if (has1) dst[1] = from_f32<Y>(c1);
    }
  }
}

// Four consecutive values of a float32 or 16-bit row as a float4 (16- or 8-byte aligned load).
template <class Y>
__device__ __forceinline__ float4 load4(const Y* p) {
  if constexpr (std::is_same<Y, float>::value) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const Y* h = reinterpret_cast<const Y*>(&v);
    return make_float4(to_f32(h[0]), to_f32(h[1]), to_f32(h[2]), to_f32(h[3]));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `shm` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float t = lane < nw ? shm[lane] : 0.f;
  return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float t = lane < nw ? shm[lane] : -INFINITY;
  return warp_max(t);
}

// Programmatic dependent launch (sm90+). A kernel started with launch() may begin while the
// kernel before it drains: it must call pdl_wait() before reading anything an earlier kernel
// wrote and before writing anything at all; work before that (streaming weights in) overlaps the
// previous kernel's tail. pdl_trigger() lets the next kernel start launching once every block of
// this one has run it. Both are no-ops below sm90, where launch() is a plain launch.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launch() asks for programmatic serialization (set once per device: compute capability
// >= 9, and AFS_CUDA_PDL != 0 in the environment).
inline bool& pdl_enabled() {
  static bool on = false;
  return on;
}

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  AFS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// 8 values of a 16-byte vector of 16-bit storage as floats.
template <class T>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f32(h[i]);
}

}  // namespace afs::cuda
