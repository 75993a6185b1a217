// Linear layers on the GPU: y[M, N] = x[M, K] . W[N, K]^T, x and W in 16-bit storage, float32
// accumulation. Two epilogues:
//  * kStore: y [M, ldy], float32 or (prefill-sized steps) the 16-bit type, rounded where a bf16
//    matmul rounds its output (split-K partial sums are added atomically into a zeroed float32 y);
//  * kSwiGLU: W's rows are interleaved gate/up pairs (row 2j = gate j, row 2j+1 = up j, see
//    interleave_gate_up), and act[m, j] = silu(gate) * up is written in the 16-bit type, so the
//    MLP's activation never round-trips through memory as float32.
//
// Kernels, picked by the number of token rows M:
//  * linear_gemv (decode: M <= 4 where the sm90a GEMM runs, else M <= 8): a weight stream. One
//    warp per output row, 16-byte loads of W, several loads in flight per lane, the M activation
//    rows kept in registers' reach through L1. Bytes moved ~ the weight matrix, which is the floor
//    for decode (measured at the copy bandwidth on an H100).
//  * sm90::gemm_wgmma (more rows, on sm90a: H100/H200): TMA-fed shared-memory stages and warpgroup
//    MMAs, a persistent grid; tile shape and K split from sm90::plan (gemm_sm90.cuh). 95-97% of
//    cuBLAS at 2048 rows, level with or ahead of it for 16-64 rows (benchmarks/NOTES.md).
//  * linear_gemm_mma (more rows, other GPUs): BM x BN x BK block tiles, warps of
//    (BM / WARPS_M) x (BN / WARPS_N), mma.sync m16n8k16 with float32 accumulators, ldmatrix
//    fragment loads from padded shared memory, a multi-stage cp.async pipeline. 128 x 128 x 64
//    tiles for prefill; 64 x 64 x 64 tiles (split over K when the grid would leave SMs idle) for
//    batched decode, where the weights dominate.
// All require K % 8 == 0 (checked at plan time).
// NOTE: tile sizes change speed; the split-K choice changes float32 summation order (results
// within rounding), never the math.
#pragma once

#include <cstdlib>
#include <string>

#include "afs/kernels/cuda/common.cuh"
#include "afs/kernels/cuda/gemm_sm90.cuh"

namespace afs::cuda {

inline constexpr int kGemvMaxRows = 8;       // the most rows linear_gemv is instantiated for
inline constexpr int kGemvMaxRowsSm90 = 4;   // where the sm90a GEMM runs, it takes over above this

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

// One lane's share of a weight row's 16-byte chunks c, c + 32, ... below c1, U loads in flight at
// a time, accumulated into the M rows' sums.
template <class T, int M, int U>
__device__ __forceinline__ void gemv_stream(const uint4* __restrict__ wr, const T* __restrict__ x, int K, int c, int c1,
                                            float* acc) {
  for (; c + 32 * (U - 1) < c1; c += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = ld_stream(wr + c + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) gemv_accumulate<T, M>(wv[u], x, K, c + 32 * u, acc);
  }
  // Fewer than U chunks per lane are left (K = 11008: 3 of 43): all in flight at once, not one
  // load's latency after another.
  uint4 tail[U - 1];
#pragma unroll
  for (int u = 0; u < U - 1; ++u)
    if (c + 32 * u < c1) tail[u] = ld_stream(wr + c + 32 * u);
#pragma unroll
  for (int u = 0; u < U - 1; ++u)
    if (c + 32 * u < c1) gemv_accumulate<T, M>(tail[u], x, K, c + 32 * u, acc);
}

// kBenchNoStore / kBenchLoadsOnly (sm90a GEMM, linear_bench only): the kernel without its
// epilogue's stores, and without its math too, to time what each costs.
enum Epilogue { kStore = 0, kSwiGLU = 1, kBenchNoStore = 2, kBenchLoadsOnly = 3 };

__device__ __forceinline__ float silu(float a) { return a / (1.f + __expf(-a)); }

// KS > 1 (kStore only): KS warps share a row, each over a consecutive 1/KS of K, their sums added
// through shared memory. For grids that fit the GPU in one pass (o and down at batch 1: 1,024
// blocks of one row per warp), where every warp would otherwise stream a whole row alone.
template <class T, int M, int EPI, int KS = 1>
__global__ void __launch_bounds__(kGemvThreads)
    linear_gemv(const T* __restrict__ x, const T* __restrict__ w, int N, int K, float* __restrict__ y, int ldy,
                T* __restrict__ act) {
  static_assert(KS == 1 || EPI == kStore, "a split row has no SwiGLU pair in its block");
  constexpr int kWarps = kGemvThreads / 32, kRows = kWarps / KS;
  const int warp = threadIdx.x >> 5;
  const int row = blockIdx.x * kRows + warp / KS, part = warp % KS;
  const int lane = threadIdx.x & 31;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  pdl_trigger();
  if (row < N) {  // no early return: the epilogues synchronise the block
    const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * K);
    const int chunks = K / 8;  // 16-byte chunks per row
    const int per = (chunks + KS - 1) / KS, c1 = min(chunks, (part + 1) * per);
    constexpr int U = kGemvUnroll<M>;
    int c = part * per + lane;
    // The first weights are in flight before the previous kernel has finished.
    uint4 first[U];
    const bool full = c + 32 * (U - 1) < c1;
    if (full)
#pragma unroll
      for (int u = 0; u < U; ++u) first[u] = ld_stream(wr + c + 32 * u);
    pdl_wait();
    if (full) {
#pragma unroll
      for (int u = 0; u < U; ++u) gemv_accumulate<T, M>(first[u], x, K, c + 32 * u, acc);
      c += 32 * U;
    }
    gemv_stream<T, M, U>(wr, x, K, c, c1, acc);
  } else {
    pdl_wait();
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if constexpr (EPI == kStore && KS == 1) {
    if (lane == 0 && row < N)
#pragma unroll
      for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * ldy + row] = acc[m];
  } else if constexpr (EPI == kStore) {
    __shared__ float parts[kWarps][M];
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) parts[warp][m] = acc[m];
    __syncthreads();
    if (threadIdx.x < kRows * M) {
      const int r = threadIdx.x / M, m = threadIdx.x % M, out_row = blockIdx.x * kRows + r;
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) sum += parts[r * KS + k][m];
      if (out_row < N) y[static_cast<size_t>(m) * ldy + out_row] = sum;
    }
  } else {
    // Rows (2j, 2j+1) = (gate j, up j) sit in warps (2i, 2i+1) of this block.
    __shared__ float sums[kWarps][M];
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) sums[warp][m] = acc[m];
    __syncthreads();
    const int I = N / 2;
    for (int e = threadIdx.x; e < (kWarps / 2) * M; e += kGemvThreads) {
      const int pair = e / M, m = e % M;
      const int j = blockIdx.x * (kWarps / 2) + pair;
      if (j < I) act[static_cast<size_t>(m) * ldy + j] = from_f32<T>(silu(sums[2 * pair][m]) * sums[2 * pair + 1][m]);
    }
  }
}

// Row permutation of a [2I, K] gate/up weight into interleaved pairs (see kSwiGLU); one block per
// destination row.
template <class T>
__global__ void interleave_gate_up(const T* __restrict__ src, T* __restrict__ dst, int I, int K) {
  const int r = blockIdx.x, j = r >> 1;
  const T* s = src + static_cast<size_t>((r & 1) ? I + j : j) * K;
  T* d = dst + static_cast<size_t>(r) * K;
  for (int i = threadIdx.x; i < K / 8; i += blockDim.x)
    reinterpret_cast<uint4*>(d)[i] = reinterpret_cast<const uint4*>(s)[i];
}

// ---------------------------------------------------------------------------------- GEMM
namespace gemm {
constexpr int PAD = 8;  // smem rows are BK + PAD elements: ldmatrix rows land in distinct banks
template <int BM, int BN, int BK, int STAGES>
constexpr int kSmemBytes = STAGES * (BM + BN) * (BK + PAD) * 2;
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

template <class T, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int EPI, class Y = float>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    linear_gemm_mma(const T* __restrict__ x, const T* __restrict__ w, int M, int N, int K, int k_split,
                    Y* __restrict__ y, int ldy, T* __restrict__ act) {
  using namespace gemm;
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NJ = WN / 8;
  static_assert(WM % 16 == 0 && NJ % 2 == 0, "warp tile");
  constexpr int LDS = BK + PAD, CPR = BK / 8;  // smem row stride; 16-byte chunks per row
  constexpr int kStageElems = (BM + BN) * LDS;
  constexpr int kChunksA = BM * CPR, kChunks = (BM + BN) * CPR;  // 16-byte chunks per stage
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int kbeg = blockIdx.z * k_split, kend = min(K, kbeg + k_split);
  pdl_trigger();
  pdl_wait();

  // Each stage: A tile [BM][LDS], then B tile [BN][LDS].
  auto load_stage = [&](int stage, int k0) {
    T* st = smem + stage * kStageElems;
#pragma unroll
    for (int c = tid; c < kChunks; c += kThreads) {
      const bool is_a = c < kChunksA;
      const int cc = is_a ? c : c - kChunksA;
      const int r = cc / CPR, col = (cc % CPR) * 8, gk = k0 + col;
      if (is_a) {
        const bool v = m0 + r < M && gk < kend;
        cp_async16(st + r * LDS + col, v ? x + static_cast<size_t>(m0 + r) * K + gk : x, v);
      } else {
        const bool v = n0 + r < N && gk < kend;
        cp_async16(st + (BM + r) * LDS + col, v ? w + static_cast<size_t>(n0 + r) * K + gk : w, v);
      }
    }
  };

  float acc[MI][NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int ktiles = (kend - kbeg + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, kbeg + s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed
    __syncthreads();              // ... for every thread, and tile kt - 1's slot is free again
    const int nt = kt + STAGES - 1;
    if (nt < ktiles) load_stage(nt % STAGES, kbeg + nt * BK);
    cp_async_commit();
    const T* sa = smem + (kt % STAGES) * kStageElems;
    const T* sb = sa + BM * LDS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[MI][4], bfr[NJ][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        // 16x16 A fragment: lanes 0-15 rows 0-15 at k, lanes 16-31 rows 0-15 at k + 8.
        const int r = wm * WM + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], sa + r * LDS + ks + (lane >> 4) * 8);
      }
#pragma unroll
      for (int j = 0; j < NJ; j += 2) {
        // Two n8 tiles: lanes 0-7 rows n0-7 @k, 8-15 rows n0-7 @k+8, 16-23 rows n8-15 @k, 24-31 @k+8.
        const int r = wn * WN + j * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t t4[4];
        ldmatrix_x4(t4, sb + r * LDS + ks + ((lane >> 3) & 1) * 8);
        bfr[j][0] = t4[0], bfr[j][1] = t4[1], bfr[j + 1][0] = t4[2], bfr[j + 1][1] = t4[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) mma_16816<T>(acc[i][j], af[i], bfr[j]);
    }
  }
  cp_async_wait<0>();
  // Epilogue: c0,c1 at (row g, cols 2t, 2t+1); c2,c3 at (row g + 8, same cols).
  const int g = lane >> 2, t4 = lane & 3;
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int row = m0 + wm * WM + i * 16 + g;
      const int col = n0 + wn * WN + j * 8 + t4 * 2;  // even
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = row + h * 8;
        if (rr >= M) continue;
        const float c0 = acc[i][j][h * 2], c1 = acc[i][j][h * 2 + 1];
        if constexpr (EPI == kSwiGLU) {
          if (col + 1 < N) act[static_cast<size_t>(rr) * ldy + col / 2] = from_f32<T>(silu(c0) * c1);
        } else {
          Y* dst = y + static_cast<size_t>(rr) * ldy + col;
          if constexpr (std::is_same<Y, float>::value) {
            if (split) {  // K splits exist only for float32 outputs (linear_epi)
              if (col < N) atomicAdd(dst, c0);
              if (col + 1 < N) atomicAdd(dst + 1, c1);
              continue;
            }
          }
          store_pair(dst, c0, c1, col < N, col + 1 < N, (ldy & 1) == 0);
        }
      }
    }
}

// The two GEMM configurations: prefill-sized (128 x 128 x 64, 8 warps, 3 stages: the best of the
// tilings benchmarks/linear_bench.cu compares, 250-263 TFLOP/s at 2048 rows on an H100 against
// 207-236 for 128 x 128 x 32) and batched-decode sized (64 x 64 x 64, 4 warps, 4 stages: 24 KB of
// weights in flight per block).
constexpr int kLargeBK = 64, kSmallBK = 64;
template <class T, int EPI, class Y = float>
inline constexpr auto gemm_large = linear_gemm_mma<T, 128, 128, kLargeBK, 2, 4, 3, EPI, Y>;
template <class T, int EPI, class Y = float>
inline constexpr auto gemm_small = linear_gemm_mma<T, 64, 64, kSmallBK, 2, 2, 4, EPI, Y>;
constexpr int kLargeSmem = gemm::kSmemBytes<128, 128, kLargeBK, 3>, kSmallSmem = gemm::kSmemBytes<64, 64, kSmallBK, 4>;
// GPUs with less shared memory per block (sm86, sm89: 99 KB) run the prefill GEMM at k = 32.
template <class T, int EPI, class Y = float>
inline constexpr auto gemm_large_k32 = linear_gemm_mma<T, 128, 128, 32, 2, 4, 3, EPI, Y>;
constexpr int kLargeK32Smem = gemm::kSmemBytes<128, 128, 32, 3>;

inline bool& large_tiles_fit() {
  static bool fit = true;
  return fit;
}

inline int& sm_count() {
  static int n = 0;
  return n;
}

// Whether linear() runs the sm90a wgmma GEMM (gemm_sm90.cuh) above kGemvMaxRowsSm90 rows: an
// sm90 GPU, a binary that carries sm_90a code, and AFS_CUDA_WGMMA != 0 in the environment.
inline bool& wgmma_enabled() {
  static bool on = false;
  return on;
}
// Whether linear_planes may split K into planes (set by linear_setup; AFS_CUDA_GEMM_PLANES=0 turns
// it off). On an H100 the planes gave +1.9% at batch 8 and +2.7% at batch 64 (benchmarks/NOTES.md).
inline bool& planes_enabled() {
  static bool on = false;
  return on;
}

// Whether the sm90a GEMM's 16-bit kStore and SwiGLU outputs (prefill-sized steps) go out through
// shared memory and TMA stores (gemm_wgmma's TS; set by linear_setup, off with
// AFS_CUDA_GEMM_TMA_STORE=0).
inline bool& tma_store_enabled() {
  static bool on = false;
  return on;
}
// Whether the SwiGLU output takes the TMA stores at every row count, not only at whole 128-row
// tiles or 512+ rows (AFS_CUDA_SWIGLU_TMA=all; linear_bench times it both ways). The rule was
// measured while the epilogue still divided in IEEE arithmetic (benchmarks/NOTES.md v15, v17).
inline bool& swiglu_tma_all_rows() {
  static bool on = false;
  return on;
}
// Whether that epilogue can run here: the sm90a GEMM and room for its staging (linear_setup).
inline bool& tma_store_fits() {
  static bool on = false;
  return on;
}

// The sm90a GEMM configurations (rows x columns per tile, stages): 160-192 KB of stages each, one
// block per SM. with_config calls f(Config<...>{}) for a tile shape the planner picked. 128 x 192
// tiles fill the SMs where 128 x 256 ones leave a wave part-empty at a few hundred rows (qkv at
// 385-512 rows: 256 tiles of 128 x 192 in two full waves against 192 of 128 x 256; o and down at
// 641-768 rows: 132 tiles, exactly one wave); AFS_CUDA_GEMM_N192=0 leaves them out of the plans.
// Each tile shape's relative speed, from the measured H100 table in benchmarks/NOTES.md
// (linear_bench `plans`): `bound` where the weights stream (M <= 128), `math` above.
namespace sm90 {
struct TileShape {
  int bm, bn;
  double bound, math;
};
inline constexpr TileShape kTileShapes[] = {{128, 256, 1.0, 1.0},
                                            {128, 192, 1.0, 0.9},
                                            {128, 128, 1.0, 0.78},
                                            {64, 128, 0.9, 0.6},
                                            {64, 64, 0.72, 0.45}};
template <class F>
void with_config(int bm, int bn, F&& f) {
  if (bm == 128 && bn == 256) f(Config<128, 256, 4>{});
  else if (bm == 128 && bn == 192) f(Config<128, 192, 4>{});
  else if (bm == 128) f(Config<128, 128, 6>{});
  else if (bn == 128) f(Config<64, 128, 8>{});
  else f(Config<64, 64, 12>{});
}

inline bool& n192_enabled() {
  static bool on = true;
  return on;
}

// A tile shape's relative speed for M rows (see plan()); 0 where it is not worth trying (M <= 64
// rows in a 128-row tile: half of each tile would be padding; 128 x 192 tiles switched off).
inline double tile_speed(const TileShape& sh, int M) {
  if (sh.bn == 192 && !n192_enabled()) return 0.0;
  if (M <= 64) return sh.bm == 128 ? 0.0 : (sh.bn == 64 ? 0.9 : 1.0);
  return M > 128 ? sh.math : sh.bound;
}

// Output tiles of shape sh over an M x N product.
inline long tile_count(const TileShape& sh, int M, int N) {
  return static_cast<long>((M + sh.bm - 1) / sh.bm) * ((N + sh.bn - 1) / sh.bn);
}

// The fraction of the last wave that does work, for `items` equal pieces on `sms` SMs.
inline double wave_efficiency(long items, int sms) {
  const long waves = (items + sms - 1) / sms;
  return static_cast<double>(items) / static_cast<double>(waves * sms);
}

struct Plan {
  int bm = 0, bn = 0, splits = 1, k_split = 0;
};

// A plan of bm x bn tiles with K cut into `splits` parts of whole k-steps (fewer when K is short:
// the returned splits is what the k_split makes).
inline Plan make_plan(int bm, int bn, int splits, int K) {
  const int k_split = ((K + splits - 1) / splits + kBK - 1) / kBK * kBK;
  return Plan{bm, bn, (K + k_split - 1) / k_split, k_split};
}

// Tile shape and K split for an M x N x K product, from the measured H100 table in
// benchmarks/NOTES.md (linear_bench `plans`): a shape's score is the fraction of its last wave
// that works times the tile's relative speed. Up to 128 rows the weights stream (memory bound):
// tiles as tall as M are best and 64-wide ones a little slower. Above 128 rows the math dominates:
// 128 x 256 tiles are the fastest per tile, 128 x 128 run at ~0.78 of them, 64-row tiles slower
// still. K is split in two only for long K (the down projection) at up to 512 rows; splitting
// otherwise lost to the memset and atomics it costs.
inline Plan plan(int M, int N, int K, bool can_split, int sms) {
  const int splits = can_split && K >= 8192 && M <= 512 ? 2 : 1;
  Plan best;
  double best_score = -1.0;
  for (const TileShape& sh : kTileShapes) {
    const double speed = tile_speed(sh, M);
    if (speed == 0.0) continue;
    const double score = wave_efficiency(tile_count(sh, M, N) * splits, sms) * speed;
    if (score > best_score) best_score = score, best = make_plan(sh.bm, sh.bn, splits, K);
  }
  return best;
}

// A plan whose K splits (up to max_splits, at least 8 k-steps each) go to separate float32 planes
// that the reader sums. Splitting is then free of memsets and atomics but not of bytes: each extra
// plane writes and reads back M x N floats, 4M/K of the weights' bytes, which the score charges.
// For decode-sized M it fills the SMs that few output tiles leave idle (o_proj at 64 rows: 32 or
// 64 tiles on 132 SMs).
inline Plan plan_planes(int M, int N, int K, int max_splits, int sms) {
  Plan best;
  double best_score = -1.0;
  for (const TileShape& sh : kTileShapes) {
    const double speed = tile_speed(sh, M);
    if (speed == 0.0) continue;
    const long tiles = tile_count(sh, M, N);
    for (int want = 1; want <= max_splits; ++want) {
      const Plan p = make_plan(sh.bm, sh.bn, want, K);
      if (p.splits != want || (want > 1 && p.k_split < 8 * kBK)) break;
      const double extra = (p.splits - 1) * 4.0 * M / K;
      const double score = wave_efficiency(tiles * p.splits, sms) * speed / (1.0 + extra);
      if (score > best_score) best_score = score, best = p;
    }
  }
  return best;
}
}  // namespace sm90

// Kernel attributes linear() relies on; call once per device before the first linear().
template <class T>
void linear_setup() {
  int dev = 0, smem_optin = 0;
  AFS_CUDA_CHECK(cudaGetDevice(&dev));
  AFS_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  large_tiles_fit() = smem_optin >= kLargeSmem;
  const auto allow = [](auto kernel, int bytes) {
    AFS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  };
  if (large_tiles_fit()) {
    allow(gemm_large<T, kStore>, kLargeSmem);
    allow(gemm_large<T, kSwiGLU>, kLargeSmem);
  }
  allow(gemm_large_k32<T, kStore>, kLargeK32Smem);
  allow(gemm_large_k32<T, kSwiGLU>, kLargeK32Smem);
  allow(gemm_small<T, kStore>, kSmallSmem);
  allow(gemm_small<T, kSwiGLU>, kSmallSmem);
  allow(gemm_small<T, kStore, T>, kSmallSmem);
  allow(gemm_large_k32<T, kStore, T>, kLargeK32Smem);
  if (large_tiles_fit()) allow(gemm_large<T, kStore, T>, kLargeSmem);
  AFS_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count(), cudaDevAttrMultiProcessorCount, dev));
  int major = 0, minor = 0;
  AFS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  AFS_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  pdl_enabled() = major >= 9 && !env_is("AFS_CUDA_PDL", "0");
  planes_enabled() = !env_is("AFS_CUDA_GEMM_PLANES", "0");
  sm90::n192_enabled() = !env_is("AFS_CUDA_GEMM_N192", "0");
  wgmma_enabled() = major == 9 && minor == 0 && !env_is("AFS_CUDA_WGMMA", "0") && sm90::probe_wgmma_code();
  tma_store_fits() = wgmma_enabled();
  if (wgmma_enabled())
    for (const auto& shape : sm90::kTileShapes)
      sm90::with_config(shape.bm, shape.bn, [&](auto c) {
        using C = decltype(c);
        allow(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kStore>, C::kSmem);
        allow(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kSwiGLU>, C::kSmem);
        allow(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kStore, T>, C::kSmem);
        if (C::kSmem + sm90::kStoreStaging<C> <= smem_optin) {
          allow(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kStore, T, true>, C::kSmem + sm90::kStoreStaging<C>);
          if constexpr (C::kBN % 128 == 0)
            allow(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kSwiGLU, float, true>,
                  C::kSmem + sm90::kStoreStaging<C>);
        } else
          tma_store_fits() = false;
      });
  tma_store_enabled() = tma_store_fits() && !env_is("AFS_CUDA_GEMM_TMA_STORE", "0");
  swiglu_tma_all_rows() = env_is("AFS_CUDA_SWIGLU_TMA", "all");
}

// linear_gemv for M <= kGemvMaxRows rows.
// Warps per weight row for an N-row kStore GEMV: 2 where the rows, one per warp, fit the SMs'
// thread slots once over (16 blocks of 128 threads per SM), else 1. That picks 2 for o and down
// (4,096 rows) and 1 for qkv and gate_up on the 7B shape; registers (76-78 a thread) actually
// hold an SM to 6 blocks, so it is a threshold, not a residency count. Measured on an H100 at
// batch 1 (benchmarks/NOTES.md, v12): this choice 5.087-5.109 ms a step, 1 everywhere 5.116,
// 2 everywhere 5.088, 4 everywhere 5.280. AFS_CUDA_GEMV_KSPLIT = 1, 2 or 4 forces it.
inline int gemv_k_split(int N) {
  static const int forced = [] {
    const char* v = std::getenv("AFS_CUDA_GEMV_KSPLIT");
    const int k = v && *v ? std::atoi(v) : 0;
    return k == 1 || k == 2 || k == 4 ? k : 0;
  }();
  if (forced) return forced;
  const long one_pass = static_cast<long>(sm_count()) * (2048 / kGemvThreads) * (kGemvThreads / 32);
  return N <= one_pass ? 2 : 1;
}

template <class T, int EPI, int KS>
void linear_gemv_launch_ks(const T* x, int M, int K, const T* w, int N, float* y, int ldy, T* act,
                           cudaStream_t stream) {
  constexpr int kRows = kGemvThreads / 32 / KS;
  const int blocks = (N + kRows - 1) / kRows;
  switch (M) {
#define AFS_GEMV_CASE(m)                                                                                          \
  case m:                                                                                                         \
    launch(linear_gemv<T, m, EPI, KS>, dim3(blocks), dim3(kGemvThreads), 0, stream, x, w, N, K, y, ldy, act); \
    break;
    AFS_GEMV_CASE(1) AFS_GEMV_CASE(2) AFS_GEMV_CASE(3) AFS_GEMV_CASE(4)
    AFS_GEMV_CASE(5) AFS_GEMV_CASE(6) AFS_GEMV_CASE(7) AFS_GEMV_CASE(8)
#undef AFS_GEMV_CASE
    default: throw_error("linear_gemv: ", M, " rows (at most ", kGemvMaxRows, ")");
  }
}

template <class T, int EPI>
void linear_gemv_launch(const T* x, int M, int K, const T* w, int N, float* y, int ldy, T* act, cudaStream_t stream) {
  if constexpr (EPI == kStore) {
    switch (gemv_k_split(N)) {
      case 2: return linear_gemv_launch_ks<T, EPI, 2>(x, M, K, w, N, y, ldy, act, stream);
      case 4: return linear_gemv_launch_ks<T, EPI, 4>(x, M, K, w, N, y, ldy, act, stream);
      default: break;
    }
  }
  linear_gemv_launch_ks<T, EPI, 1>(x, M, K, w, N, y, ldy, act, stream);
}

// The sm90a GEMM (after linear_setup<T>() found it available).
// plane > 0 (kStore into float32 only): K split p's partial product goes to y + p * plane with plain
// stores, no memset and no atomics; the reader sums the planes (see linear_planes).
template <class T, int EPI, class Y>
void linear_wgmma_plan(const sm90::Plan& p, const T* x, int M, int K, const T* w, int N, Y* y, int ldy, T* act,
                       cudaStream_t stream, long plane = 0) {
  using namespace sm90;
  const CUtensorMap& mx = tensor_map(x, M, K);
  const CUtensorMap& mw = tensor_map(w, N, K);
  const long items = static_cast<long>((M + p.bm - 1) / p.bm) * ((N + p.bn - 1) / p.bn) * p.splits;
  const dim3 grid(static_cast<unsigned>(std::min<long>(items, sm_count())));
  if (p.splits > 1 && plane == 0) AFS_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(Y) * size_t(M) * N, stream));
  with_config(p.bm, p.bn, [&](auto c) {
    using C = decltype(c);
    // The TMA-store epilogue where its output (map_y: y's, or act's for SwiGLU) is a whole
    // 16-byte-aligned matrix (tensor_map's rule).
    auto storable = [](const void* p, int cols, int ld) {
      return tma_store_enabled() && ld == cols && cols % 8 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    };
    auto launch_ts = [&](const auto& map_y) {  // generic: instantiated only where a branch below calls it
      launch(gemm_wgmma<T, C::kBM, C::kBN, C::kStages, EPI, Y, true>, grid, dim3(C::kThreads),
             C::kSmem + kStoreStaging<C>, stream, mx, mw, map_y, M, N, K, p.k_split, p.splits, y, ldy, act, plane);
    };
    if constexpr (std::is_same<Y, T>::value && EPI == kStore) {
      if (p.splits == 1 && storable(y, N, ldy)) return launch_ts(tensor_map(y, M, N));
    }
    // SwiGLU through TMA only where linear_bench measured it ahead (H100, gate_up 4096 -> 22016):
    // whole 128-row tiles (M 256, 384, 512, 2048: 8-18% faster) or M >= 512; with a partial last
    // row tile at 136-352 rows it was 5-11% slower than the direct stores (448: a tie).
    if constexpr (EPI == kSwiGLU && C::kBN % 128 == 0) {
      if (p.splits == 1 && (M % 128 == 0 || M >= 512 || swiglu_tma_all_rows()) && N % 2 == 0 &&
          storable(act, N / 2, ldy))
        return launch_ts(tensor_map(act, M, N / 2));
    }
    launch(gemm_wgmma<T, C::kBM, C::kBN, C::kStages, EPI, Y>, grid, dim3(C::kThreads), C::kSmem, stream, mx, mw, mx, M,
           N, K, p.k_split, p.splits, y, ldy, act, plane);
  });
}

// Whether a kStore GEMM may split K: partial sums are added atomically, so only into a float32 y
// whose rows are contiguous.
template <class Y, int EPI>
constexpr bool can_split_k(int N, int ldy) {
  return EPI == kStore && std::is_same<Y, float>::value && ldy == N;
}

template <class T, int EPI, class Y>
void linear_wgmma(const T* x, int M, int K, const T* w, int N, Y* y, int ldy, T* act, cudaStream_t stream) {
  linear_wgmma_plan<T, EPI, Y>(sm90::plan(M, N, K, can_split_k<Y, EPI>(N, ldy), sm_count()), x, M, K, w, N, y, ldy,
                               act, stream);
}

// y[M, N] = x[M, K] . W[N, K]^T (EPI kStore; y float32, or the 16-bit type rounded like a bf16
// matmul's output, row stride ldy; split over K only into float32 with ldy == N) or
// act[M, N / 2] = swiglu (EPI kSwiGLU, row stride ldy), on `stream`, after linear_setup<T>().
template <class T, int EPI, class Y = float>
void linear_epi(const T* x, int M, int K, const T* w, int N, Y* y, int ldy, T* act, cudaStream_t stream) {
  // The GEMV reads the M activation rows from L1 once per weight row: at 8 rows it is L1 bound
  // (1.4-1.9 TB/s of weights on an H100), where the sm90a GEMM streams 2.0-3.0 TB/s from 16 rows
  // down (its row tiles are padded with zeros). The GEMV writes float32 only (16-bit outputs are
  // for prefill-sized steps; fewer rows go to the GEMMs, correct at any M).
  const bool gemv = std::is_same<Y, float>::value && M <= (wgmma_enabled() ? kGemvMaxRowsSm90 : kGemvMaxRows);
  if (gemv) {
    if constexpr (std::is_same<Y, float>::value) linear_gemv_launch<T, EPI>(x, M, K, w, N, y, ldy, act, stream);
  } else if (wgmma_enabled()) {
    linear_wgmma<T, EPI, Y>(x, M, K, w, N, y, ldy, act, stream);
  } else if (M <= 64 || (N + 127) / 128 * ((M + 127) / 128) < 3 * sm_count() / 4) {
    // Few rows, or a 128 x 128 grid that would leave SMs idle: 64 x 64 tiles, and the weight
    // stream split over K (in whole tiles) until about three blocks per SM are in flight
    // (benchmarks/linear_bench.cu: a block streams ~6 GB/s of weights; the SM needs several).
    const int tiles = (N + 63) / 64 * ((M + 63) / 64);
    int splits = 1;
    if (can_split_k<Y, EPI>(N, ldy))
      while (tiles * splits < 3 * sm_count() && K / (splits * 2) >= 512) splits *= 2;
    const int k_split = ((K + splits - 1) / splits + kSmallBK - 1) / kSmallBK * kSmallBK;
    splits = (K + k_split - 1) / k_split;
    if (splits > 1) AFS_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(Y) * size_t(M) * N, stream));
    launch(gemm_small<T, EPI, Y>, dim3((N + 63) / 64, (M + 63) / 64, splits), dim3(128), kSmallSmem, stream, x, w, M,
           N, K, k_split, y, ldy, act);
  } else {
    dim3 grid((N + 127) / 128, (M + 127) / 128, 1);
    if (large_tiles_fit())
      launch(gemm_large<T, EPI, Y>, grid, dim3(256), kLargeSmem, stream, x, w, M, N, K, K, y, ldy, act);
    else
      launch(gemm_large_k32<T, EPI, Y>, grid, dim3(256), kLargeK32Smem, stream, x, w, M, N, K, K, y, ldy, act);
  }
  AFS_CUDA_CHECK(cudaGetLastError());
}

template <class T, class Y>
void linear(const T* x, int M, int K, const T* w, int N, Y* y, int ldy, cudaStream_t stream) {
  linear_epi<T, kStore, Y>(x, M, K, w, N, y, ldy, nullptr, stream);
}

inline constexpr int kPlaneMaxRows = 256;  // above this the planes' bytes outweigh what they fill

// y = x W^T into float32 [M, N] planes: returns how many planes P the product used (1: y holds it
// whole), plane p at y + p * plane (plane >= M * N elements); the reader sums y[p] over p in
// order, so the result does not depend on timing. At most max_planes. Where the sm90a GEMM runs
// a decode-sized M (5 .. kPlaneMaxRows rows), K is split when sm90::plan_planes finds that fills
// more SMs; otherwise this is linear().
template <class T>
int linear_planes(const T* x, int M, int K, const T* w, int N, float* y, long plane, int max_planes,
                  cudaStream_t stream) {
  if (planes_enabled() && wgmma_enabled() && max_planes > 1 && M > kGemvMaxRowsSm90 && M <= kPlaneMaxRows) {
    const sm90::Plan p = sm90::plan_planes(M, N, K, max_planes, sm_count());
    if (p.splits > 1) {
      linear_wgmma_plan<T, kStore, float>(p, x, M, K, w, N, y, N, nullptr, stream, plane);
      AFS_CUDA_CHECK(cudaGetLastError());
      return p.splits;
    }
  }
  linear<T>(x, M, K, w, N, y, N, stream);
  return 1;
}

// act[M, I] = silu(x W_gate^T) * (x W_up^T) with w the interleaved [2I, K] gate/up weight.
template <class T>
void linear_swiglu(const T* x, int M, int K, const T* w, int I, T* act, cudaStream_t stream) {
  linear_epi<T, kSwiGLU, float>(x, M, K, w, 2 * I, nullptr, I, act, stream);
}

}  // namespace afs::cuda
