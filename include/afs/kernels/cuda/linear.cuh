// Linear layers on the GPU: y[M, N] (float32) = x[M, K] . W[N, K]^T, x and W in 16-bit storage.
//
// Two kernels, picked by the number of token rows M:
//  * linear_gemv (M <= kGemvMaxRows, decode): a weight stream. One warp per output row, 16-byte
//    loads of W, several loads in flight per lane, the M activation rows kept in registers' reach
//    through L1. Bytes moved ~ the weight matrix, which is the floor for decode.
//  * linear_gemm_mma (prefill): 128x128x32 block tiles, 8 warps of 64x32, mma.sync m16n8k16 with
//    float32 accumulators, ldmatrix fragment loads from padded shared memory, a cp.async double
//    buffer. Requires K % 8 == 0 (checked at plan time).
// NOTE: tile sizes change speed, never results.
#pragma once

#include "afs/kernels/cuda/common.cuh"

namespace afs::cuda {

inline constexpr int kGemvMaxRows = 8;

// ---------------------------------------------------------------------------------- GEMV
// Weights are streamed once: ld.global.nc with L1::no_allocate keeps them from evicting the
// activations, which every warp of the block re-reads from L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

inline constexpr int kGemvThreads = 128;  // 4 warps, one output row each
// 16-byte weight loads in flight per lane: 8 for decode-sized M; fewer where M's accumulators and
// activation registers would spill.
template <int M>
inline constexpr int kGemvUnroll = M <= 2 ? 8 : 4;

template <class T, int M>
__device__ __forceinline__ void gemv_accumulate(const uint4& wv, const T* __restrict__ x, int K, int c, float* acc) {
  float wf[8];
  unpack8<T>(wv, wf);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float xf[8];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K) + c), xf);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[m] = fmaf(wf[e], xf[e], acc[m]);
  }
}

template <class T, int M>
__global__ void __launch_bounds__(kGemvThreads) linear_gemv(const T* __restrict__ x, const T* __restrict__ w, int N,
                                                            int K, float* __restrict__ y, int ldy) {
  const int row = blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * K);
  const int chunks = K / 8;  // 16-byte chunks per row
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  constexpr int U = kGemvUnroll<M>;
  int c = lane;
  for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = ld_stream(wr + c + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) gemv_accumulate<T, M>(wv[u], x, K, c + 32 * u, acc);
  }
  for (; c < chunks; c += 32) gemv_accumulate<T, M>(ld_stream(wr + c), x, K, c, acc);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0) y[static_cast<size_t>(m) * ldy + row] = s;
  }
}

// ---------------------------------------------------------------------------------- GEMM
namespace gemm {
constexpr int BM = 128, BN = 128, BK = 32, PAD = 8, LDS = BK + PAD;  // LDS: smem row stride (elements)
constexpr int kThreads = 256;
constexpr int kStageElems = (BM + BN) * LDS;
constexpr int kSmemBytes = 2 * kStageElems * 2;  // two stages of 16-bit elements
}  // namespace gemm

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // src-size 0 zero-fills the destination
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <class T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <class T>
__global__ void __launch_bounds__(gemm::kThreads) linear_gemm_mma(const T* __restrict__ x, const T* __restrict__ w,
                                                                  int M, int N, int K, float* __restrict__ y,
                                                                  int ldy) {
  using namespace gemm;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / 4, wn = warp % 4;  // 2 x 4 warps, each 64 (M) x 32 (N)
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

  // Each stage: A tile [BM][LDS], then B tile [BN][LDS]. 256 threads x 16 B: 2 chunks of A and 2 of B.
  auto load_stage = [&](int stage, int k0) {
    T* sa = smem + stage * kStageElems;
    T* sb = sa + BM * LDS;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kThreads;  // 0..511: row = chunk / 4, col = (chunk % 4) * 8
      const int r = chunk >> 2, cc = (chunk & 3) * 8;
      const int gk = k0 + cc;
      const bool va = (m0 + r < M) && (gk < K);
      const bool vb = (n0 + r < N) && (gk < K);
      cp_async16(sa + r * LDS + cc, va ? x + static_cast<size_t>(m0 + r) * K + gk : x, va);
      cp_async16(sb + r * LDS + cc, vb ? w + static_cast<size_t>(n0 + r) * K + gk : w, vb);
    }
    cp_async_commit();
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int ktiles = (K + BK - 1) / BK;
  load_stage(0, 0);
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) {
      load_stage((kt + 1) & 1, (kt + 1) * BK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sa = smem + (kt & 1) * kStageElems;
    const T* sb = sa + BM * LDS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[4][4], bfr[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // 16x16 A fragment: lanes 0-15 rows 0-15 at k, lanes 16-31 rows 0-15 at k + 8.
        const int r = wm * 64 + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], sa + r * LDS + ks + (lane >> 4) * 8);
      }
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        // Two n8 tiles: lanes 0-7 rows n0-7 @k, 8-15 rows n0-7 @k+8, 16-23 rows n8-15 @k, 24-31 @k+8.
        const int r = wn * 32 + j * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t t4[4];
        ldmatrix_x4(t4, sb + r * LDS + ks + ((lane >> 3) & 1) * 8);
        bfr[j][0] = t4[0], bfr[j][1] = t4[1], bfr[j + 1][0] = t4[2], bfr[j + 1][1] = t4[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], af[i], bfr[j]);
    }
    __syncthreads();
  }
  // Epilogue: c0,c1 at (row g, cols 2t, 2t+1); c2,c3 at (row g + 8, same cols).
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = m0 + wm * 64 + i * 16 + g;
      const int col = n0 + wn * 32 + j * 8 + t4 * 2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = row + h * 8;
        if (rr >= M) continue;
        if (col < N) y[static_cast<size_t>(rr) * ldy + col] = acc[i][j][h * 2];
        if (col + 1 < N) y[static_cast<size_t>(rr) * ldy + col + 1] = acc[i][j][h * 2 + 1];
      }
    }
}

// Kernel attributes linear() relies on; call once per device before the first linear().
template <class T>
void linear_setup() {
  AFS_CUDA_CHECK(cudaFuncSetAttribute(linear_gemm_mma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      gemm::kSmemBytes));
}

// y[M, N] = x[M, K] . W[N, K]^T on `stream` (after linear_setup<T>()).
template <class T>
void linear(const T* x, int M, int K, const T* w, int N, float* y, int ldy, cudaStream_t stream) {
  if (M <= kGemvMaxRows) {
    const int blocks = (N + kGemvThreads / 32 - 1) / (kGemvThreads / 32);
    switch (M) {
#define AFS_GEMV_CASE(m) \
  case m: linear_gemv<T, m><<<blocks, kGemvThreads, 0, stream>>>(x, w, N, K, y, ldy); break;
      AFS_GEMV_CASE(1) AFS_GEMV_CASE(2) AFS_GEMV_CASE(3) AFS_GEMV_CASE(4)
      AFS_GEMV_CASE(5) AFS_GEMV_CASE(6) AFS_GEMV_CASE(7) AFS_GEMV_CASE(8)
#undef AFS_GEMV_CASE
    }
  } else {
    dim3 grid((N + gemm::BN - 1) / gemm::BN, (M + gemm::BM - 1) / gemm::BM);
    linear_gemm_mma<T><<<grid, gemm::kThreads, gemm::kSmemBytes, stream>>>(x, w, M, N, K, y, ldy);
  }
  AFS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace afs::cuda
