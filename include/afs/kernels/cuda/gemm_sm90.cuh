// The Hopper (sm90a) GEMM: y[M, N] = x[M, K] . W[N, K]^T with the tensor-memory accelerator (TMA)
// filling a ring of shared-memory stages and warpgroup MMAs (wgmma) reading them.
//
// Block = one producer warpgroup + BM / 64 consumer warpgroups. One thread of the producer issues
// the TMA copies of each k-step (64 columns of BM x-rows and BN W-rows, 128-byte swizzled, which
// is the layout wgmma's descriptors read) and the copies complete on the stage's `full` mbarrier;
// each consumer warpgroup multiplies its 64 rows by the BN columns with m64nBNk16 wgmmas into
// float32 registers, then hands the stage back through its `empty` mbarrier. The grid is
// persistent (one block per SM): a block walks work items (output tile, K split) and the producer
// runs ahead into the next item while the consumers store the last one.
//
// x and W both come in through tensor maps (cuTensorMapEncodeTiled, 64 x 64 boxes) made once per
// (pointer, rows, cols) and cached; rows past M and columns past K read as zeros. Epilogues as
// linear.cuh's: float32 stores (atomic adds into a zeroed y when split over K), or SwiGLU over
// interleaved gate/up rows into the 16-bit activation.
//
// Only compiled into sm_90a code: wgmma_available() reports at run time whether the loaded
// binary has it for this GPU (a binary built for sm80 only does not, even on an H100).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "afs/kernels/cuda/common.cuh"
#include "afs/kernels/cuda/wgmma_ops.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AFS_SM90A_DEVICE 1
#endif

namespace afs::cuda::sm90 {

constexpr int kBK = 64;   // k per stage: one 128-byte swizzle row of 16-bit values
constexpr int kBox = 64;  // rows per TMA box (A and B tiles are whole boxes)
constexpr int kGroupM = 16;  // output tiles are visited in groups of 16 row tiles (L2 reuse of W)

template <int BM, int BN, int STAGES>
struct Config {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kConsumers = BM / 64;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kABytes = BM * kBK * 2, kBBytes = BN * kBK * 2, kStageBytes = kABytes + kBBytes;
  // Stages, then the full and empty barriers; 1 KB of slack to align the stages to 1 KB (the
  // 128-byte swizzle pattern repeats every 8 rows = 1 KB, and descriptors assume that alignment).
  static constexpr int kSmem = STAGES * kStageBytes + 2 * STAGES * 8 + 1024;
  static_assert(BM % 64 == 0 && BN % 64 == 0 && BN <= 256, "tile");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef AFS_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// A 64 x 64 box at (column c0, row c1) of `map` into `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}
// A box of a rank-3 tensor map at coordinates (c0, c1, c2), innermost first, into `dst`, completing
// on `bar` (the paged KV pools of attention_sm90.cuh: (column, kv head, cache slot)).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}
// TMA stores (the 16-bit epilogue's, see gemm_wgmma's TS): a 64 x 64 box from `src` to (column
// c0, row c1) of `map` (rows and columns past the map's dims are not written), in this thread's
// current bulk group; commit the group; wait until the groups' reads of shared memory (read) or
// their writes (all) are done. Threads that wrote `src` run fence_proxy_async before the barrier
// that lets the storing thread go.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(smem_addr(src))
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's generic-proxy shared-memory writes before later async-proxy (wgmma, TMA
// store) reads.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Named barrier `id` (1 .. 15; 0 is __syncthreads) over n threads: wait for all / arrive only.
__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmmas.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups 1 KB
// apart. The start address advances by 32 bytes per k16 step inside the swizzle row.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return ((smem_addr(p) & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
#endif

// silu(g) = g / (1 + e^-g) with the approximate division (one reciprocal and a multiply): the
// IEEE division's range checks and slow-path branches, 64 times per thread in a 128 x 256 tile's
// epilogue, showed in linear_bench as SwiGLU epilogues far slower than plain 16-bit ones. Exact
// to a few ulp of float32, far below the bf16 rounding of the result; g < -88 (e^-g = inf)
// gives -0, the limit.
__device__ __forceinline__ float silu_fast(float g) { return __fdividef(g, 1.f + __expf(-g)); }

// A work item: the output tile at rows m0.., columns n0.., over the k-steps kb, kb + kBK, ... (nk
// of them: its K split).
struct WorkItem {
  int m0, n0, kb, nk;
};

// Work item w of tiles_m x tiles_n tiles x K splits of k_split. Row tiles vary fastest within
// groups of kGroupM, so the blocks in flight share a few W column tiles and all of x's rows.
template <int BM, int BN>
__device__ __forceinline__ WorkItem work_item(int w, int tiles_m, int tiles_n, int K, int k_split) {
  const int tiles = tiles_m * tiles_n;
  const int split = w / tiles;
  const int t = w - split * tiles;
  const int per_group = kGroupM * tiles_n;
  const int first = (t / per_group) * kGroupM;
  const int gm = min(tiles_m - first, kGroupM);
  const int r = t - (t / per_group) * per_group;
  const int kb = split * k_split;
  return WorkItem{(first + r % gm) * BM, (r / gm) * BN, kb, (min(K - kb, k_split) + kBK - 1) / kBK};
}

// Shared memory of the TMA-store epilogue (TS): 16 KB (two 64 x 64 boxes of 16-bit values) per
// consumer warpgroup, past the stages.
template <class Cfg>
constexpr int kStoreStaging = Cfg::kConsumers * 16384;

// TS (16-bit kStore outputs, no K split, ldy == N, map_y the tensor map of y; or SwiGLU with BN a
// multiple of 128, map_y that of act [M, N / 2]): the epilogue writes each warpgroup's rows into its
// staging boxes in shared memory and one thread stores them with TMA, so the warpgroup goes on to
// the next tile's MMAs while the stores drain; otherwise map_y is unused and every thread stores
// its own results.
template <class T, int BM, int BN, int STAGES, int EPI, class Y = float, bool TS = false>
__global__ void __launch_bounds__(Config<BM, BN, STAGES>::kThreads, 1)
    gemm_wgmma(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
               const __grid_constant__ CUtensorMap map_y, int M, int N, int K, int k_split, int splits,
               Y* __restrict__ y, int ldy, T* __restrict__ act, long plane) {
#ifdef AFS_SM90A_DEVICE
  using Cfg = Config<BM, BN, STAGES>;
  static_assert(!TS || (EPI == 0 && sizeof(Y) == 2) || (EPI == 1 && BN % 128 == 0),
                "TMA stores: 16-bit kStore outputs, or SwiGLU over whole 64-column boxes of act");
  constexpr int kStaging = TS ? kStoreStaging<Cfg> : 0;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // stages start on a 1 KB boundary
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * Cfg::kStageBytes + kStaging);
  uint64_t* empty = full + STAGES;
  const int wg = threadIdx.x / 128;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int items = tiles_m * tiles_n * splits;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], Cfg::kConsumers * 4);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  pdl_trigger();

  if (wg == 0) {
    // ---- producer: one thread issues every copy.
    if constexpr (Cfg::kConsumers > 1) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_x)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_w)) : "memory");
      auto load_w = [&](int s, int k0, int n0) {
        unsigned char* sb = smem + s * Cfg::kStageBytes + Cfg::kABytes;
#pragma unroll
        for (int j = 0; j < BN / kBox; ++j) tma_load(sb + j * kBox * 128, &map_w, &full[s], k0, n0 + j * kBox);
      };
      auto load_x = [&](int s, int k0, int m0) {
        unsigned char* sa = smem + s * Cfg::kStageBytes;
#pragma unroll
        for (int j = 0; j < BM / kBox; ++j) tma_load(sa + j * kBox * 128, &map_x, &full[s], k0, m0 + j * kBox);
      };
      // The weights of the first stages are in flight before the previous kernel finishes (they
      // are constants); x is its output, so its copies wait.
      int pre = 0;
      if (static_cast<int>(blockIdx.x) < items) {
        const WorkItem wi = work_item<BM, BN>(blockIdx.x, tiles_m, tiles_n, K, k_split);
        pre = min(wi.nk, STAGES);
        for (int s = 0; s < pre; ++s) {
          mbar_expect_tx(&full[s], Cfg::kStageBytes);
          load_w(s, wi.kb + s * kBK, wi.n0);
        }
        pdl_wait();
        for (int s = 0; s < pre; ++s) load_x(s, wi.kb + s * kBK, wi.m0);
      } else {
        pdl_wait();
      }
      int it = pre;
      for (int w = blockIdx.x; w < items; w += gridDim.x) {
        const WorkItem wi = work_item<BM, BN>(w, tiles_m, tiles_n, K, k_split);
        for (int kt = (w == static_cast<int>(blockIdx.x)) ? pre : 0; kt < wi.nk; ++kt, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // a fresh barrier's previous phase counts as done
          mbar_expect_tx(&full[s], Cfg::kStageBytes);
          load_w(s, wi.kb + kt * kBK, wi.n0);
          load_x(s, wi.kb + kt * kBK, wi.m0);
        }
      }
    }
  } else {
    // ---- consumers: warpgroup c owns rows [64 c, 64 c + 64) of each tile.
    if constexpr (Cfg::kConsumers > 1) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    pdl_wait();
    const int c = wg - 1, lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    float acc[BN / 2];
    int it = 0;
    for (int w = blockIdx.x; w < items; w += gridDim.x) {
      const WorkItem wi = work_item<BM, BN>(w, tiles_m, tiles_n, K, k_split);
      const int nk = wi.nk;
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
      for (int kt = 0; kt < nk; ++kt, ++it) {
        const int s = it % STAGES;
        mbar_wait(&full[s], (it / STAGES) & 1);
        const unsigned char* sa = smem + s * Cfg::kStageBytes + c * kBox * 128;
        const uint64_t da = smem_desc(sa), db = smem_desc(smem + s * Cfg::kStageBytes + Cfg::kABytes);
        if constexpr (EPI != 3) {  // 3: linear_bench's loads-only timing (the pipeline without the math)
          fence_regs<BN / 2>(acc);
          wgmma_fence();
#pragma unroll
          for (int k = 0; k < kBK / 16; ++k) wgmma_ss<T, BN>(acc, da + 2 * k, db + 2 * k);
          wgmma_commit();
          fence_regs<BN / 2>(acc);
          // The previous k-step's wgmmas are done with their stage: hand it back.
          wgmma_wait<1>();
          fence_regs<BN / 2>(acc);
        }
        if (kt > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % STAGES]);
      }
      wgmma_wait<0>();
      fence_regs<BN / 2>(acc);
      if (nk > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % STAGES]);
      if constexpr (EPI >= 2) {  // linear_bench's timings without the epilogue's stores
        // The products must stay live, or ptxas drops the wgmmas as dead code (Nsight Compute showed
        // the tensor pipe idle in this variant before): a store no launch takes (M >= 1).
        if constexpr (EPI == 2) {
          float sum = 0.f;
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) sum += acc[i];
          if (M < 0) y[threadIdx.x] = static_cast<Y>(sum);
        }
        continue;
      }

      // Epilogue. Accumulator j*4 + {0,1}: row 16 warp + lane/4, columns 8 j + 2 (lane % 4) + {0,1};
      // j*4 + {2,3}: 8 rows further down.
      // TS: this warpgroup's 16 KB of staging (two 64 x 64 boxes of 128-byte rows); its first
      // thread issues the TMA stores.
      [[maybe_unused]] unsigned char* const staging = smem + STAGES * Cfg::kStageBytes + c * 16384;
      [[maybe_unused]] const bool leader = (threadIdx.x & 127) == 0;
      if constexpr (TS && EPI == 1) {
        // SwiGLU: the warpgroup's 64 rows x BN / 2 act columns fill BN / 128 staging boxes (one
        // round). Pair j (gate, up) of a thread is act column 4 j + lane % 4: box j / 16, 16-byte
        // chunk (j % 16) / 2, half j % 2 of it.
        if (leader) bulk_wait_read();  // the last tile's stores are done reading
        bar_sync(1 + c, 128);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          unsigned char* const box = staging + (j / 16) * 8192;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = warp * 16 + (lane >> 2) + h * 8;
            const float g = acc[j * 4 + h * 2], u = acc[j * 4 + h * 2 + 1];
            *reinterpret_cast<T*>(box + r * 128 + ((((j % 16) >> 1) ^ (r & 7)) << 4) + 8 * (j & 1) + 2 * (lane & 3)) =
                from_f32<T>(silu_fast(g) * u);
          }
        }
        fence_proxy_async();
        bar_sync(1 + c, 128);
        if (leader) {
#pragma unroll
          for (int b = 0; b < BN / 128; ++b)
            tma_store(&map_y, staging + b * 8192, wi.n0 / 2 + b * 64, wi.m0 + c * 64);
          bulk_commit();
        }
        continue;
      } else if constexpr (TS) {
        // Through the two staging boxes (the 16-byte chunks XOR-swizzled by row as the map's
        // 128-byte swizzle expects: conflict-free writes), BN / 64 boxes in rounds of two.
#pragma unroll
        for (int b0 = 0; b0 < BN / 64; b0 += 2) {
          if (leader) bulk_wait_read();  // the last round's (or tile's) stores are done reading
          bar_sync(1 + c, 128);
#pragma unroll
          for (int b = b0; b < b0 + 2 && b < BN / 64; ++b) {
            unsigned char* const box = staging + (b - b0) * 8192;
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
              const int j = b * 8 + jj;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int r = warp * 16 + (lane >> 2) + h * 8;
                *reinterpret_cast<uint32_t*>(box + r * 128 + ((jj ^ (r & 7)) << 4) + 4 * (lane & 3)) =
                    pack2<T>(acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]);
              }
            }
          }
          fence_proxy_async();
          bar_sync(1 + c, 128);
          if (leader) {
            for (int b = b0; b < b0 + 2 && b < BN / 64; ++b)
              tma_store(&map_y, staging + (b - b0) * 8192, wi.n0 + b * 64, wi.m0 + c * 64);
            bulk_commit();
          }
        }
        continue;
      }
      const int row0 = wi.m0 + c * 64 + warp * 16 + (lane >> 2);
      const int col0 = wi.n0 + (lane & 3) * 2;
      // K splits: added atomically into y, or (plane > 0) each stored into its own plane.
      const bool split = splits > 1 && plane == 0;
      Y* const yp = y + (plane > 0 ? static_cast<size_t>(wi.kb / k_split) * plane : 0);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = col0 + j * 8;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + h * 8;
          if (row >= M) continue;
          const float c0 = acc[j * 4 + h * 2], c1 = acc[j * 4 + h * 2 + 1];
          if constexpr (EPI == 1) {  // SwiGLU: (gate, up) = columns (col, col + 1)
            if (col + 1 < N)
              act[static_cast<size_t>(row) * ldy + col / 2] = from_f32<T>(silu_fast(c0) * c1);
          } else {
            Y* dst = yp + static_cast<size_t>(row) * ldy + col;
            if constexpr (std::is_same<Y, float>::value) {
              if (split) {  // atomic K splits exist only for float32 outputs (sm90::plan)
                if (col + 1 < N && (ldy & 1) == 0) {
                  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(c0, c1));  // one vector reduction
                } else {
                  if (col < N) atomicAdd(dst, c0);
                  if (col + 1 < N) atomicAdd(dst + 1, c1);
                }
                continue;
              }
            }
            store_pair(dst, c0, c1, col < N, col + 1 < N, (ldy & 1) == 0);
          }
        }
      }
    }
    if constexpr (TS) {
      if ((threadIdx.x & 127) == 0) bulk_wait_all();  // the last stores land before the grid ends
    }
  }
#endif
}

// Whether this process's binary carries the sm90a GEMM for the current GPU: a one-thread probe
// compiled into the same fat binary reports which code the driver picked.
__global__ void wgmma_probe(int* out) {
#ifdef AFS_SM90A_DEVICE
  *out = 1;
#else
  *out = 0;
#endif
}

inline bool probe_wgmma_code() {
  int* d = nullptr;
  int h = 0;
  AFS_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
  wgmma_probe<<<1, 1>>>(d);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d);
  AFS_CUDA_CHECK(err);
  return h == 1;
}

// ---- tensor maps (host)
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    AFS_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || p == nullptr)
      throw_error("the CUDA driver does not provide cuTensorMapEncodeTiled (needed by the sm90a GEMM)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A 128-byte-swizzled tensor map over 16-bit data: rank dims (innermost first), byte strides of
// the outer rank - 1 dims, the box. Out-of-bounds elements read as zero. Returns false when the
// driver refuses the layout.
template <class T>
bool encode_tensor_map(CUtensorMap* map, const T* p, int rank, const cuuint64_t* dims, const cuuint64_t* strides,
                       const cuuint32_t* box) {
  static_assert(sizeof(T) == 2, "16-bit data");
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapDataType dt =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return tensor_map_encoder()(map, dt, rank, const_cast<T*>(p), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor map of a row-major [rows, cols] 16-bit matrix read in 64 x 64 boxes, 128-byte
// swizzled. Made once per (pointer, rows, cols) and kept: a map is a pure function of those.
template <class T>
const CUtensorMap& tensor_map(const T* p, int rows, int cols) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, CUtensorMap> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(static_cast<const void*>(p), rows, cols);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cols % 8 != 0 || reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw_error("sm90a GEMM: a [", rows, ", ", cols, "] operand needs 16-byte aligned rows");
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(T)};
  const cuuint32_t box[2] = {kBK, kBox};
  if (!encode_tensor_map(&map, p, 2, dims, strides, box))
    throw_error("cuTensorMapEncodeTiled failed for a [", rows, ", ", cols, "] matrix");
  return cache.emplace(key, map).first->second;
}

}  // namespace afs::cuda::sm90
