// Causal prefill attention over the paged KV cache for Hopper (sm90a), FlashAttention-3 style:
// the same contract as attention_prefill (attention.cuh) but built on TMA and warpgroup MMAs.
// Checked on an H100 against a float32 reference (benchmarks/attention_bench.cu) and end to end
// (tests/test_gpu.py).
//
// Contract. q and out [T, n_heads, D] (the step's token rows), K/V pools [slots, n_kv, D] with
// slot = bt[bt_off + pos / bs] * bs + pos % bs (bs = 1 << bs_log2, at least 8 here: see "Loads").
// tiles[i] = {sequence, first row}: tiles of kRows (128) query rows of one sequence chunk, rows
// q0 .. q0+127 at positions pos0 + row, each attending keys 0 .. its own position (earlier chunks
// included, through the block table). GQA: query head h reads kv head h / (n_heads / n_kv).
// Softmax in the log2 domain: p = exp2(s * scale_log2 - m), scale_log2 = log2(e) / sqrt(D); float32
// accumulation, output rounded to T. Grid (n_tiles, n_heads), tiles walked last to first.
//
// Block = 3 warpgroups (384 threads, 1 block per SM):
//  * warpgroup 0, the producer: one thread walks the key tiles (kBc = 128 keys) and issues the TMA
//    copies of K and V into a ring of kStages stages, K and V on separate full/empty mbarriers so
//    S = Q K^T can start before V lands. Its other threads exit; it keeps 24 registers.
//  * warpgroups 1 and 2, the consumers (240 registers each): warpgroup c owns query rows
//    64c .. 64c+63 of the tile. It loads its Q rows into shared memory once (cp.async), then for
//    each key tile: S = Q K^T (8 x wgmma m64n128k16, Q and K from shared memory, both K-major),
//    mask, online softmax in registers, O += P V (8 x wgmma m64nDk16, P from registers, V from
//    shared memory MN-major). Intra-warpgroup pipelining: the S product of tile j is issued
//    together with the P V product of tile j - 1, and the softmax of tile j runs while P V of
//    j - 1 is still on the tensor cores. With kPingPong the two consumers also take turns issuing
//    (named barriers 3, 4), so one warpgroup's softmax overlaps the other's MMAs.
//  Epilogue: O / l, rounded, staged through the warpgroup's own Q rows in shared memory and
//  written with 16-byte stores.
//
// Loads. TMA over the pool, not cp.async gathers: the pool is a rank-3 tensor (D, n_kv, slots)
// and a box is 64 columns x R = min(bs, kBc) consecutive slots of one kv head, which never crosses
// a cache block (R divides bs and the key tiles start at multiples of kBc). A 128-key tile is
// kBc / R boxes per 64-column half (16 TMA copies per K or V tile at bs 16), issued by one thread;
// the hardware writes the 128-byte swizzle wgmma reads, completion is counted in bytes on the
// stage's mbarrier, and no consumer register or instruction is spent on addresses. (cp.async
// would take 32 copies per thread of a producer warpgroup per tile, register addresses, and a
// proxy fence before every wgmma read.) Boxes of R rows land at multiples of R * 128 bytes in the
// stage; bs >= 8 keeps them on the 1 KB swizzle-pattern boundary (the launcher refuses smaller
// blocks). Keys past the chunk's end: whole boxes past it are not loaded; in the last tile the
// consumers zero V's rows from kend on (stale or never-written slots may hold NaN, and
// 0 * NaN = NaN in P V) and mask S with a select, so K's rows there never matter.
//
// Shared memory (dynamic, 1 KB aligned): Q [D/64][128 rows][128 B], then K stages, then V stages,
// each [D/64][kBc rows][128 B], then the mbarriers. "[half][row][128 B]" = 64 columns of a row in
// one 128-byte line; lines are 128-byte swizzled: the 16-byte chunk j of row r sits at chunk
// position j ^ (r % 8) (address bits [4:6] ^= bits [7:9]; the pattern repeats every 8 rows = 1 KB,
// and every tile and half starts on a 1 KB boundary). This is what TMA's SWIZZLE_128B writes and
// the cp.async Q loads and the epilogue compute by hand.
//
// Layouts (PTX ISA 9.7.15.5.1, "Register Fragments and Shared Memory Matrix Layouts"):
//  * Matrix descriptor (64 bit): bits 0-13 start address >> 4, 16-29 leading byte offset (LBO) >> 4,
//    32-45 stride byte offset (SBO) >> 4, 49-51 base offset (0: patterns start on 1 KB), 62-63
//    swizzle (1 = 128 B).
//  * S = Q K^T: A = Q (M = 64 rows x K = 16 columns per k-step), B = K (N = 128 keys x 16 columns),
//    both K-major (imm-trans 0), 128 B swizzle: canonical ((8,m),(T,2k)):((8T,SBO),(1,T)) in
//    elements, T = 8: rows 128 B apart inside an 8-row group, groups SBO = 1024 B apart; LBO unused
//    (1). k-step kk (columns 16kk .. 16kk+15) starts at half kk / 4 plus 32 (kk % 4) bytes inside
//    the line: the hardware applies the swizzle to the final address, as in gemm_sm90.cuh
//    (smem_desc, GPU-verified). Warpgroup c's A starts at row 64c (8 KB into each half).
//  * O += P V: B = V (K = 16 keys x N = D columns), stored V[key][d]: the N index is contiguous,
//    so B is MN-major (imm-trans-b = 1, allowed for 16-bit types). Canonical MN-major 128 B
//    swizzle: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)): 64 contiguous N elements (one 128 B line),
//    the next 64 N at LBO, 8 K rows 128 B apart, the next 8 K rows at SBO. With V in
//    [half][key][128 B]: LBO = kBc * 128 B (the next 64 columns of d), SBO = 1024 B (8 keys);
//    k-step kk starts at key 16kk, 2 KB further (whole swizzle patterns, base offset 0). This is
//    the same physical layout as K's, read with the other major-ness.
//  * Accumulator D of m64nNk16 (float32, N/2 registers per thread; CuTe CLayout_64xN): thread
//    t = 128-thread index, w = t / 32, l = t % 32, g = l / 4, q = l % 4; d[4j + 2h + e] is row
//    16w + g + 8h, column 8j + 2q + e (h, e in {0, 1}). Rows 16w + g and 16w + g + 8 of each
//    tile belong to the 4 lanes of one quad: row max and sum reduce over shuffles xor 1, 2.
//  * A from registers, m64k16 16-bit (CuTe ALayout_64x16): four 32-bit registers a[0..3] holding
//    (a0,a1) (a2,a3) (a4,a5) (a6,a7), low half first; a0,a1 = row 16w + g, columns 2q, 2q+1;
//    a2,a3 = row +8, same columns; a4,a5 = row 16w + g, columns 8 + 2q, 8 + 2q + 1; a6,a7 = row
//    +8, columns 8 + 2q (+1). P is S's accumulator (keys = columns): the k-step kk covers keys
//    16kk .. 16kk+15 = accumulator column groups j = 2kk (a0..a3) and 2kk + 1 (a4..a7), so
//    a[r] = pack(S[8kk + 2r], S[8kk + 2r + 1]), i.e. P[i] = pack(S[2i], S[2i + 1]) for all i and
//    the k-step's A is P[4kk .. 4kk+3]. No data moves between threads.
//
// Ordering rules followed (PTX ISA 9.7.15): wgmma.fence between register writes (S, O, P) and the
// wgmma that reads them; A registers (P) and accumulators untouched until wgmma.wait_group says
// their product is done; generic-proxy writes of shared memory that wgmma reads (the Q load, the
// zeroed V rows) are followed by fence.proxy.async and a warpgroup barrier before the wgmma.
#pragma once

#include <cuda.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "afs/kernels/cuda/attention.cuh"
#include "afs/kernels/cuda/gemm_sm90.cuh"
#include "afs/kernels/cuda/wgmma_ops.cuh"

namespace afs::cuda::sm90 {

// Prefill tiling for the wgmma kernel: kStages K and V stages in the ring; kPingPong: the two
// consumer warpgroups take turns issuing their MMAs; kLongestFirst: grid (heads, tiles), so the
// blocks start in tile order, the last (longest) query tiles of every head first and the shortest
// last (without: grid (tiles, heads), head by head, so the last heads' longest tiles start late and
// run alone at the end). 128 query rows and 128 keys per tile are fixed by the kernel. Changes
// speed, not results.
template <int kStages_, bool kPingPong_, bool kLongestFirst_ = true>
struct AttnTiling {
  static constexpr int kStages = kStages_;
  static constexpr bool kPingPong = kPingPong_;
  static constexpr bool kLongestFirst = kLongestFirst_;
  static_assert(kStages >= 2, "the ring needs a stage in flight while one is read");
};
// H100 (benchmarks/attention_bench.cu, causal, 32 heads of 128, TFLOP/s at 2k / 4k / 8k tokens):
// without ping-pong 307 / 384 / 451 against 306 / 376 / 417 with it (an earlier run: 308 / 384 /
// 441 against 304 / 374 / 436); 3 stages 298 / 372 / 426 with ping-pong, 298 / 379 / 433 without.
using AttnTilingH100 = AttnTiling<2, false>;

inline constexpr int kAttnRows = 128;  // query rows per tile (the caller's tiles)
inline constexpr int kAttnKeys = 128;  // keys per K/V tile

template <int D, class Tiling>
struct AttnConfig {
  static_assert(D == 64 || D == 128, "head_dim: 64 or 128 (one or two 128-byte swizzle lines per row)");
  static constexpr int BR = kAttnRows, BC = kAttnKeys, ST = Tiling::kStages;
  static constexpr int kHalves = D / 64;
  static constexpr int kThreads = 384;
  static constexpr int kQBytes = BR * D * 2, kKVBytes = BC * D * 2;  // Q; one K or V stage
  static constexpr int kKOff = kQBytes, kVOff = kKOff + ST * kKVBytes, kBarOff = kVOff + ST * kKVBytes;
  // 4 barriers per stage (full/empty for K and V); 1 KB of slack to align the base.
  static constexpr int kSmem = kBarOff + 4 * ST * 8 + 1024;
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
};

#ifdef AFS_SM90A_DEVICE
namespace attn90 {
// Named barriers (bar_sync, bar_arrive from gemm_sm90.cuh): 0 is __syncthreads; 1 + c syncs
// consumer warpgroup c alone; 3 + c is "consumer c may issue its MMAs" (ping-pong).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
template <int N>
__device__ __forceinline__ void fence_regs_u32(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// Descriptor of an MN-major operand (see the header: 128 B swizzle, SBO = 8 rows = 1 KB, LBO = the
// distance between 64-column halves).
__device__ __forceinline__ uint64_t smem_desc_mn(const void* p, uint32_t lbo_bytes) {
  return ((smem_addr(p) & 0x3FFFFu) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
}  // namespace attn90
#endif

// kmap / vmap: the pools' tensor maps (kv_pool_tensor_map, boxes of min(bs, kAttnKeys) slots).
template <class T, int D, class Tiling = AttnTilingH100>
__global__ void __launch_bounds__(AttnConfig<D, Tiling>::kThreads, 1)
    attention_prefill_wgmma(const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap vmap,
                            const T* __restrict__ q, const SeqMeta* __restrict__ seqs,
                            const int2* __restrict__ tiles, const int* __restrict__ bt, int bs_log2, int n_heads,
                            int n_kv, float scale_log2, T* __restrict__ out) {
#ifdef AFS_SM90A_DEVICE
  using namespace attn90;
  using Cfg = AttnConfig<D, Tiling>;
  constexpr int BR = Cfg::BR, BC = Cfg::BC, ST = Cfg::ST, HALVES = Cfg::kHalves;
  constexpr int LINE = 128;               // bytes of one swizzled row line (64 columns)
  constexpr int CH = D / 8;               // 16-byte chunks per row
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* qs = smem;
  unsigned char* ks = smem + Cfg::kKOff;
  unsigned char* vs = smem + Cfg::kVOff;
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + Cfg::kBarOff);
  uint64_t* empty_k = full_k + ST;
  uint64_t* full_v = full_k + 2 * ST;
  uint64_t* empty_v = full_k + 3 * ST;

  // NOTE: metadata (tiles, seqs, bt) is uploaded before the step's first kernel and no kernel
  // writes it (see attention_decode), so it is read before pdl_wait(); q and the pools wait.
  constexpr bool kLf = Tiling::kLongestFirst;
  const int2 tile = kLf ? tiles[gridDim.y - 1 - blockIdx.y] : tiles[gridDim.x - 1 - blockIdx.x];
  const SeqMeta sq = seqs[tile.x];
  const int h = kLf ? blockIdx.x : blockIdx.y, kvh = h / (n_heads / n_kv);
  const int q0 = tile.y, T_ = sq.n, pos0 = sq.pos0;
  const int kend = pos0 + min(q0 + BR, T_);  // keys 0 .. kend-1 are needed by the tile
  const int n_kt = (kend + BC - 1) / BC;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; ++s) {
      mbar_init(&full_k[s], 1);
      mbar_init(&full_v[s], 1);
      mbar_init(&empty_k[s], 8);  // one arrival per consumer warp
      mbar_init(&empty_v[s], 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  pdl_trigger();

  if (wg == 0) {
    // ---- producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&kmap)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&vmap)) : "memory");
      const int* table = bt + sq.bt_off;
      const int r_log2 = min(bs_log2, 7);  // rows per box: min(bs, BC) (BC = 128)
      static_assert(BC == 128, "r_log2 above");
      pdl_wait();
      for (int kt = 0; kt < n_kt; ++kt) {
        const int s = kt % ST;
        const uint32_t parity = ((kt / ST) & 1) ^ 1;  // a fresh barrier's previous phase counts as done
        const int k0 = kt * BC;
        const int n_box = (min(BC, kend - k0) + (1 << r_log2) - 1) >> r_log2;
        const uint32_t bytes = static_cast<uint32_t>(n_box) << (r_log2 + 7 + (HALVES - 1));
        auto load = [&](const CUtensorMap* map, unsigned char* stage, uint64_t* bar) {
          mbar_expect_tx(bar, bytes);
          for (int i = 0; i < n_box; ++i) {
            const int pos = k0 + (i << r_log2);
            const int slot = static_cast<int>(kv_slot(table, pos, bs_log2));
#pragma unroll
            for (int hh = 0; hh < HALVES; ++hh)
              tma_load_3d(stage + hh * BC * LINE + (i << r_log2) * LINE, map, bar, hh * 64, kvh, slot);
          }
        };
        mbar_wait(&empty_k[s], parity);
        load(&kmap, ks + s * Cfg::kKVBytes, &full_k[s]);
        mbar_wait(&empty_v[s], parity);
        load(&vmap, vs + s * Cfg::kKVBytes, &full_v[s]);
      }
    }
  } else {
    // ---- consumers: warpgroup c owns tile rows 64c .. 64c+63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int c = wg - 1;
    const int tid = threadIdx.x - 128 * wg, warp = tid >> 5, lane = tid & 31;
    const int QS = n_heads * D;
    pdl_wait();

    // Q rows of this warpgroup into [half][row][128 B] (swizzled); rows past the chunk are zeros.
    {
      const T* qsrc = q + static_cast<size_t>(sq.q_start) * QS + h * D;
#pragma unroll
      for (int i = tid; i < 64 * CH; i += 128) {
        const int row = c * 64 + i / CH, cc = i % CH;
        const bool ok = q0 + row < T_;
        unsigned char* dst = qs + (cc / 8) * BR * LINE + row * LINE + (((cc % 8) ^ (row & 7)) << 4);
        cp_async16(dst, ok ? qsrc + static_cast<size_t>(q0 + row) * QS + cc * 8 : q, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      bar_sync(1 + c, 128);
    }

    // This thread's rows (accumulator layout): r_lo = 64c + 16 warp + lane / 4 and r_lo + 8.
    const int r_lo = c * 64 + warp * 16 + (lane >> 2);
    const int qpos_lo = pos0 + q0 + r_lo, qpos_hi = qpos_lo + 8;
    const int qpos_first = pos0 + q0 + c * 64;  // the warpgroup's first row position
    const int tq2 = 2 * (lane & 3);

    // Descriptors: base of this warpgroup's Q rows, of K stage 0 (both K-major) and V stage 0
    // (MN-major). Offsets are added in 16-byte units to the address field.
    const uint64_t dq = smem_desc(qs + c * 64 * LINE);
    const uint64_t dk = smem_desc(ks);
    const uint64_t dv = smem_desc_mn(vs, BC * LINE);

    float o[D / 2];
    float s[BC / 2];
    uint32_t p[BC / 4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BC / 2; ++i) s[i] = 0.f;  // only so that s is defined: tile 0's first MMA ignores it
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // m in scaled (log2) units

    auto issue_s = [&](int st) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t a = dq + (((kk / 4) * BR * LINE + (kk % 4) * 32) >> 4);
        const uint64_t b = dk + ((st * Cfg::kKVBytes + (kk / 4) * BC * LINE + (kk % 4) * 32) >> 4);
        if (kk == 0)
          wgmma_ss_init<T, BC>(s, a, b);
        else
          wgmma_ss<T, BC>(s, a, b);
      }
    };
    auto issue_pv = [&](int st) {
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk)
        wgmma_rs_mn<T, D>(o, p + 4 * kk, dv + ((st * Cfg::kKVBytes + kk * 16 * LINE) >> 4));
    };
    // Mask (causal and past-the-end keys, where the tile reaches them), new running max, s ->
    // exp2(s * scale - m) in place, l updated; returns the factors the old O must be scaled by.
    auto softmax = [&](int k0, float& corr_lo, float& corr_hi) {
      if (k0 + BC - 1 > qpos_first || k0 + BC > kend) {
        const int lim_lo = min(qpos_lo, kend - 1) - k0 - tq2, lim_hi = min(qpos_hi, kend - 1) - k0 - tq2;
#pragma unroll
        for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * j + e > lim_lo) s[4 * j + e] = -INFINITY;  // a select: NaN from garbage K goes too
            if (8 * j + e > lim_hi) s[4 * j + 2 + e] = -INFINITY;
          }
        }
      }
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
        mx_lo = fmaxf(mx_lo, fmaxf(s[4 * j], s[4 * j + 1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[4 * j + 2], s[4 * j + 3]));
      }
#pragma unroll
      for (int o_ = 1; o_ < 4; o_ <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o_));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o_));
      }
      const float new_lo = fmaxf(m_lo, mx_lo * scale_log2), new_hi = fmaxf(m_hi, mx_hi * scale_log2);
      // Rows with every key masked so far keep max -inf: use 0 as the reference to avoid inf - inf.
      const float ref_lo = new_lo == -INFINITY ? 0.f : new_lo, ref_hi = new_hi == -INFINITY ? 0.f : new_hi;
      corr_lo = ex2(m_lo - ref_lo), corr_hi = ex2(m_hi - ref_hi);
      m_lo = new_lo, m_hi = new_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
        s[4 * j] = ex2(fmaf(s[4 * j], scale_log2, -ref_lo));
        s[4 * j + 1] = ex2(fmaf(s[4 * j + 1], scale_log2, -ref_lo));
        s[4 * j + 2] = ex2(fmaf(s[4 * j + 2], scale_log2, -ref_hi));
        s[4 * j + 3] = ex2(fmaf(s[4 * j + 3], scale_log2, -ref_hi));
        sum_lo += s[4 * j] + s[4 * j + 1];
        sum_hi += s[4 * j + 2] + s[4 * j + 3];
      }
      l_lo = l_lo * corr_lo + sum_lo;  // per-thread partial sums; the quad adds them at the end
      l_hi = l_hi * corr_hi + sum_hi;
    };
    // P (the A fragment of the k-steps) from the probabilities in s: P[i] = pack(s[2i], s[2i+1]).
    auto pack_p = [&] {
#pragma unroll
      for (int i = 0; i < BC / 4; ++i) p[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
    };
    auto release = [&](uint64_t* bar) {
      if (lane == 0) mbar_arrive(bar);
    };
    // Ping-pong: consumer c waits for its turn before issuing, then hands the turn over.
    auto turn_wait = [&] {
      if constexpr (Tiling::kPingPong) bar_sync(3 + c, 256);
    };
    auto turn_pass = [&] {
      if constexpr (Tiling::kPingPong) bar_arrive(3 + (1 - c), 256);
    };
    if constexpr (Tiling::kPingPong) {
      if (c == 1) bar_arrive(3, 256);  // consumer 0 issues first
    }

    // Tile 0: S only.
    mbar_wait(&full_k[0], 0);
    turn_wait();
    fence_regs<BC / 2>(s);
    wgmma_fence();
    issue_s(0);
    wgmma_commit();
    turn_pass();
    wgmma_wait<0>();
    fence_regs<BC / 2>(s);
    release(&empty_k[0]);
    {
      float corr_lo, corr_hi;
      softmax(0, corr_lo, corr_hi);  // O is still zero: no rescale
    }
    pack_p();

    // Tile kt: S(kt) and P V(kt - 1) issued together; the softmax of kt overlaps P V(kt - 1).
    for (int kt = 1; kt < n_kt; ++kt) {
      const int st = kt % ST, sp = (kt - 1) % ST;
      mbar_wait(&full_k[st], (kt / ST) & 1);
      mbar_wait(&full_v[sp], ((kt - 1) / ST) & 1);
      turn_wait();
      fence_regs<BC / 2>(s);
      fence_regs<D / 2>(o);
      fence_regs_u32<BC / 4>(p);
      wgmma_fence();
      issue_s(st);
      wgmma_commit();
      issue_pv(sp);
      wgmma_commit();
      turn_pass();
      fence_regs<BC / 2>(s);
      wgmma_wait<1>();  // S(kt) is done; P V(kt - 1) may still run
      fence_regs<BC / 2>(s);
      release(&empty_k[st]);
      float corr_lo, corr_hi;
      softmax(kt * BC, corr_lo, corr_hi);
      wgmma_wait<0>();
      fence_regs<D / 2>(o);
      fence_regs_u32<BC / 4>(p);
      release(&empty_v[sp]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[4 * j] *= corr_lo, o[4 * j + 1] *= corr_lo;
        o[4 * j + 2] *= corr_hi, o[4 * j + 3] *= corr_hi;
      }
      pack_p();
    }

    // Last P V. Rows of V from kend on are zeroed first where the tile is partial (see "Loads").
    {
      const int kt = n_kt - 1, sl = kt % ST;
      mbar_wait(&full_v[sl], (kt / ST) & 1);
      const int valid = kend - kt * BC;
      if (valid < BC) {
        unsigned char* vb = vs + sl * Cfg::kKVBytes;
        for (int i = tid; i < (BC - valid) * HALVES * 8; i += 128) {
          const int row = valid + i / (HALVES * 8), hh = (i / 8) % HALVES, ch = i % 8;
          *reinterpret_cast<uint4*>(vb + hh * BC * LINE + row * LINE + ch * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
        bar_sync(1 + c, 128);
      }
      turn_wait();
      fence_regs<D / 2>(o);
      fence_regs_u32<BC / 4>(p);
      wgmma_fence();
      issue_pv(sl);
      wgmma_commit();
      if (c == 0) turn_pass();  // consumer 1's last turn goes unclaimed: every barrier phase completes
      wgmma_wait<0>();
      fence_regs<D / 2>(o);
      release(&empty_v[sl]);
    }

    // Epilogue: O / l in T, staged in this warpgroup's Q rows (its S products are done with them;
    // wgmma completion includes the proxy fence), then 16-byte stores of the valid rows.
#pragma unroll
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
      l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o_);
      l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o_);
    }
    const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
    bar_sync(1 + c, 128);  // every warp of the warpgroup is past its last MMA
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      // column 8j + tq2: half j / 8, chunk j % 8, bytes 2 tq2 within it; rows r_lo, r_lo + 8 share r % 8.
      const int off = (j / 8) * BR * LINE + (((j % 8) ^ (r_lo & 7)) << 4) + 2 * tq2;
      *reinterpret_cast<uint32_t*>(qs + off + r_lo * LINE) = pack2<T>(o[4 * j] * inv_lo, o[4 * j + 1] * inv_lo);
      *reinterpret_cast<uint32_t*>(qs + off + (r_lo + 8) * LINE) =
          pack2<T>(o[4 * j + 2] * inv_hi, o[4 * j + 3] * inv_hi);
    }
    bar_sync(1 + c, 128);
    T* dst = out + static_cast<size_t>(sq.q_start) * QS + h * D;
#pragma unroll
    for (int i = tid; i < 64 * CH; i += 128) {
      const int row = c * 64 + i / CH, cc = i % CH;
      if (q0 + row < T_)
        *reinterpret_cast<uint4*>(dst + static_cast<size_t>(q0 + row) * QS + cc * 8) =
            *reinterpret_cast<const uint4*>(qs + (cc / 8) * BR * LINE + row * LINE + (((cc % 8) ^ (row & 7)) << 4));
    }
  }
#endif
}

// The tensor map of a paged K or V pool [slots, n_kv, D] as a rank-3 tensor (D, n_kv, slots),
// read in boxes of 64 columns x 1 kv head x `rows` slots, 128-byte swizzled. Made once per
// (pointer, slots, n_kv, D, rows) and kept: a map is a pure function of those.
template <class T>
const CUtensorMap& kv_pool_tensor_map(const T* pool, size_t slots, int n_kv, int D, int rows) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int, int, int>, CUtensorMap> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(static_cast<const void*>(pool), slots, n_kv, D, rows);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (D % 64 != 0 || reinterpret_cast<uintptr_t>(pool) % 16 != 0)
    throw_error("sm90a attention: a KV pool needs 16-byte alignment and head_dim a multiple of 64");
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(n_kv),
                              static_cast<cuuint64_t>(slots)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(D) * sizeof(T),
                                 static_cast<cuuint64_t>(n_kv) * D * sizeof(T)};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(rows)};
  if (!encode_tensor_map(&map, pool, 3, dims, strides, box))
    throw_error("cuTensorMapEncodeTiled failed for a KV pool of ", slots, " slots x ", n_kv, " heads x ", D);
  return cache.emplace(key, map).first->second;
}

// Launches attention_prefill_wgmma over n_tiles tiles of kAttnRows rows (built like the caller's
// attention_prefill tiles, with kAttnRows instead of attn::kBr). pool_slots: the slots of each pool.
// Needs a binary with sm_90a code on an sm90 GPU (probe_wgmma_code()).
template <class T, int D, class Tiling = AttnTilingH100>
void attention_prefill_sm90(const T* q, const T* kpool, const T* vpool, size_t pool_slots, const SeqMeta* seqs,
                            const int2* tiles, int n_tiles, const int* bt, int bs_log2, int n_heads, int n_kv,
                            float scale_log2, T* out, cudaStream_t stream) {
  using Cfg = AttnConfig<D, Tiling>;
  if (bs_log2 < 3)
    throw_error("sm90a attention: KV block size ", 1 << bs_log2,
                " is below 8 (TMA boxes must start on the 1 KB swizzle boundary)");
  if (n_kv <= 0 || n_heads % n_kv != 0) throw_error("sm90a attention: ", n_heads, " heads over ", n_kv, " kv heads");
  if (n_tiles <= 0) return;
  static const bool attrs_set = [] {
    AFS_CUDA_CHECK(
        cudaFuncSetAttribute(attention_prefill_wgmma<T, D, Tiling>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Cfg::kSmem));
    return true;
  }();
  (void)attrs_set;
  const int rows = std::min(1 << bs_log2, kAttnKeys);
  const CUtensorMap& km = kv_pool_tensor_map(kpool, pool_slots, n_kv, D, rows);
  const CUtensorMap& vm = kv_pool_tensor_map(vpool, pool_slots, n_kv, D, rows);
  const dim3 grid = Tiling::kLongestFirst ? dim3(n_heads, n_tiles) : dim3(n_tiles, n_heads);
  launch(attention_prefill_wgmma<T, D, Tiling>, grid, dim3(Cfg::kThreads), Cfg::kSmem, stream, km, vm, q, seqs, tiles,
         bt, bs_log2, n_heads, n_kv, scale_log2, out);
}

}  // namespace afs::cuda::sm90
