// Causal attention over the paged KV cache on the GPU (GQA: query head h reads kv head h / G).
//
// Layouts: q [T, n_heads, D] (the step's token rows), out the same; the layer's K and V pools are
// [slots, n_kv, D] with slot = block * block_size + position % block_size, block = the sequence's
// block table entry for position / block_size (block_size a power of two). 16-bit storage,
// float32 math. Every kernel reads the step's metadata (SeqMeta, block tables) from the device, so
// a captured step replays for any positions and block tables.
//
//  * attention_prefill: FlashAttention-2 style over tiles of attn::kBr (64) query rows of one
//    sequence chunk (tiles[i] = {sequence, first row}), 4 warps of 16 rows (PrefillTiling). Key
//    tiles of 64 are gathered through the block table into shared memory with cp.async: V of a
//    tile loads while S = Q K^T runs, K of the next tile while O += P V runs. Both products run on
//    tensor cores (mma.sync m16n8k16, B fragments through ldmatrix / ldmatrix.trans); softmax is
//    online in registers (exp2, log2e folded into the scale). The S accumulators are reused
//    directly as the A operand of P V. The grid walks the tiles last to first, so the longest
//    (latest) tiles start first.
//  * attention_decode + attention_decode_combine: one query row per sequence (decode tokens). A
//    block owns (key split, kv head, sequence) and all G query heads of the group, so each K/V row
//    is read once per group: D/8 lanes hold 16 bytes of a key, the block's 128/(D/8) lane groups
//    walk the split's keys with an online softmax, then merge in shared memory. Each thread streams
//    its own K/V pieces through a ring of shared-memory stages with cp.async, several stages ahead
//    of its math (no block barrier in the loop: a thread reads back only what it copied). The grid
//    has as many splits as it takes to fill the GPU at this batch size (one for large batches),
//    sized by the caller for the largest context; each sequence spreads its own keys over all of
//    them (decode_split_len), so short contexts still use every block. Blocks left without keys
//    write an empty part, so the grid is fixed and lives in CUDA graphs. The last block of a
//    (sequence, kv head) to finish merges the splits (decode_combine_last); the engine runs
//    attention_decode_combine instead only with AFS_CUDA_FUSED_COMBINE=0.
//    benchmarks/attention_bench.cu checks and times all of these against a float32 reference.
#pragma once

#include <type_traits>

#include "afs/kernels/cuda/common.cuh"
#include "afs/kernels/cuda/elementwise.cuh"
#include "afs/kernels/cuda/linear.cuh"

namespace afs::cuda {

// One sequence's part of a step: token rows q_start .. q_start+n-1 at positions pos0 .. pos0+n-1;
// its block table is bt[bt_off ...].
struct SeqMeta {
  int q_start, n, pos0, bt_off;
};

__device__ __forceinline__ size_t kv_slot(const int* __restrict__ table, int pos, int bs_log2) {
  return (static_cast<size_t>(table[pos >> bs_log2]) << bs_log2) + (pos & ((1 << bs_log2) - 1));
}

namespace attn {
constexpr int kWarps = 4;

// Prefill tiling: kM m16 row tiles per warp (query rows per tile = kWarps * 16 * kM), kBc keys per
// K/V tile, registers capped for kMinBlocks blocks per SM. K and V tiles of kBc rows share the 48 KB
// of static shared memory. Changes speed, not results.
template <int kM_, int kBc_, int kMinBlocks_>
struct PrefillTiling {
  static constexpr int kM = kM_, kBc = kBc_, kMinBlocks = kMinBlocks_;
  static constexpr int kRows = kWarps * 16 * kM;
  static_assert(kBc % 16 == 0, "key tiles are whole mma k-steps");
};
// H100: <1, 64, 3> (168 registers, 12 bytes spilled); 128-row tiles <2, 32, 2> measured -1% at 2k
// tokens, +5% at 4k, +14% at 8k (benchmarks/NOTES.md), but halve the blocks of short prompts.
using PrefillTilingH100 = PrefillTiling<1, 64, 3>;
constexpr int kBr = PrefillTilingH100::kRows;  // query rows per prefill tile (the caller's tiles)

// Four 8x8 16-bit matrices, transposed: lane l receives M[2 (l % 4)][l / 4], M[2 (l % 4) + 1][l / 4]
// of matrix i in r[i], where lanes 8i .. 8i+7 give the addresses of matrix i's rows.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Waits for this thread's cp.async groups but the newest N; the memory clobber keeps the compiler
// from moving shared-memory reads above it (no barrier follows in the decode loop).
template <int N>
__device__ __forceinline__ void wait_own_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 8 floats from a 16-byte register vector of 16-bit values (bit operations on the register, so the
// vector is loaded whole rather than as 8 separate 2-byte loads).
template <class T>
__device__ __forceinline__ void unpack8_reg(const uint4 v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      f[2 * i] = to_f32(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
      f[2 * i + 1] = to_f32(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
}
}  // namespace attn

// A thread's 8 columns of one key in the pool's format (see kv_fp8): 16 bytes, or 8 for fp8.
template <class KV>
using KvPiece = std::conditional_t<kIsFp8Kv<KV>, uint2, uint4>;

namespace attn {
// 8 floats from a KvPiece (fp8: exact, through f16x2).
template <class T, class KV>
__device__ __forceinline__ void unpack8_kv(const KvPiece<KV> v, float* f) {
  if constexpr (kIsFp8Kv<KV>) {
    fp8x4_to_f32(v.x, f);
    fp8x4_to_f32(v.y, f + 4);
  } else {
    unpack8_reg<T>(v, f);
  }
}
// 8 floats rounded to the pool's format (fp8 straight from float32, not through T).
template <class T, class KV>
__device__ __forceinline__ KvPiece<KV> pack8_kv(const float* f) {
  if constexpr (kIsFp8Kv<KV>) {
    return make_uint2(fp8x4(f[0], f[1], f[2], f[3]), fp8x4(f[4], f[5], f[6], f[7]));
  } else {
    return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
  }
}
// One KvPiece from global to shared memory (zero-filled when !valid).
template <class KV>
__device__ __forceinline__ void cp_async_piece(void* smem, const void* gmem, bool valid) {
  if constexpr (kIsFp8Kv<KV>) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 8 : 0));
  } else {
    cp_async16(smem, gmem, valid);
  }
}
}  // namespace attn

template <class T, int D, class Tiling = attn::PrefillTilingH100>
__global__ void __launch_bounds__(attn::kWarps * 32, Tiling::kMinBlocks)
    attention_prefill(const T* __restrict__ q, const T* __restrict__ kpool, const T* __restrict__ vpool,
                      const SeqMeta* __restrict__ seqs, const int2* __restrict__ tiles, const int* __restrict__ bt,
                      int bs_log2, int n_heads, int n_kv, float scale_log2, T* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  using namespace attn;
  constexpr int MT = Tiling::kM, BC = Tiling::kBc, BR = Tiling::kRows;
  static_assert(D % 32 == 0, "head_dim: ldmatrix.x4 covers 32 columns");
  static_assert(BC * (D / 8) % (kWarps * 32) == 0, "whole 16-byte copies per thread");
  constexpr int LD = D + 8;  // padded smem row (elements): ldmatrix rows land in distinct banks
  __shared__ __align__(16) T ks[BC * LD];
  __shared__ __align__(16) T vs[BC * LD];
  // Grid (heads, tiles): blocks start in tile order, the last (longest) tiles of every head first.
  const int2 tile = tiles[gridDim.y - 1 - blockIdx.y];
  const SeqMeta sq = seqs[tile.x];
  const int* table = bt + sq.bt_off;
  const int h = blockIdx.x, kvh = h / (n_heads / n_kv);
  const int q0 = tile.y;  // first query row of the tile within the sequence chunk
  const int T_ = sq.n, pos0 = sq.pos0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int QS = n_heads * D, KS = n_kv * D;
  const T* qs = q + static_cast<size_t>(sq.q_start) * QS;
  T* os = out + static_cast<size_t>(sq.q_start) * QS;

  // Keys needed by the tile: 0 .. pos0 + min(q0 + BR, T_) - 1.
  const int kend = pos0 + min(q0 + BR, T_);
  const int n_kt = (kend + BC - 1) / BC;
  // One BC-key tile of the K or V pool, gathered through the block table; keys past kend are zeros.
  auto load_tile = [&](T* dst, const T* __restrict__ pool, int k0) {
#pragma unroll 2
    for (int i = 0; i < BC * (D / 8) / (kWarps * 32); ++i) {
      const int c = threadIdx.x + i * kWarps * 32;
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool valid = k0 + r < kend;
      const T* src = valid ? pool + kv_slot(table, k0 + r, bs_log2) * KS + kvh * D + col : pool;
      cp_async16(dst + r * LD + col, src, valid);
    }
    cp_async_commit();
  };
  load_tile(ks, kpool, 0);

  // Q fragments for this warp's MT x 16 rows, all of D.
  int r_lo[MT];
  uint32_t qf[MT][D / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    r_lo[mt] = q0 + (warp * MT + mt) * 16 + g;
    const int rl = r_lo[mt], rh = rl + 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c = kk * 16 + tq * 2;
      auto ld = [&](int r, int col) -> uint32_t {
        return r < T_ ? *reinterpret_cast<const uint32_t*>(qs + static_cast<size_t>(r) * QS + h * D + col) : 0u;
      };
      qf[mt][kk][0] = ld(rl, c);
      qf[mt][kk][1] = ld(rh, c);
      qf[mt][kk][2] = ld(rl, c + 8);
      qf[mt][kk][3] = ld(rh, c + 8);
    }
  }
  float o[MT][D / 8][4];
  float m_lo[MT], m_hi[MT], l_lo[MT], l_hi[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_lo[mt] = m_hi[mt] = -INFINITY, l_lo[mt] = l_hi[mt] = 0.f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
  }

  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * BC;
    cp_async_wait<0>();
    __syncthreads();  // K(kt) is in for every thread; every warp is done with V(kt - 1)
    load_tile(vs, vpool, k0);
    // S = Q K^T for MT x 16 rows x BC keys. One ldmatrix.x4 gives b0, b1 of two k-steps: lanes
    // 8i .. 8i+7 address keys j*8 .. j*8+7 at columns kk*16 + 8i.
    float s[MT][BC / 8][4];
#pragma unroll
    for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + (j * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][j], qf[mt][kk], b);
          mma_16816<T>(s[mt][j], qf[mt][kk + 1], b + 2);
        }
      }
    }
    // Mask (causal and past-the-end) and online softmax. NOTE: skipping the mask on tiles wholly
    // below the diagonal (a block-uniform flag) made ptxas spill; the compares are cheap.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int qpos_lo = pos0 + r_lo[mt], qpos_hi = qpos_lo + 8;
      float mx_lo = m_lo[mt], mx_hi = m_hi[mt];
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + j * 8 + tq * 2 + (e & 1);
          const int qp = e < 2 ? qpos_lo : qpos_hi;
          float v = s[mt][j][e] * scale_log2;
          if (key > qp || key >= kend) v = -INFINITY;
          s[mt][j][e] = v;
        }
        mx_lo = fmaxf(mx_lo, fmaxf(s[mt][j][0], s[mt][j][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[mt][j][2], s[mt][j][3]));
      }
#pragma unroll
      for (int o_ = 1; o_ < 4; o_ <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o_));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o_));
      }
      // Rows with every key masked so far keep max -inf: use 0 as the reference to avoid inf - inf.
      const float ref_lo = mx_lo == -INFINITY ? 0.f : mx_lo, ref_hi = mx_hi == -INFINITY ? 0.f : mx_hi;
      const float corr_lo = exp2f(m_lo[mt] - ref_lo), corr_hi = exp2f(m_hi[mt] - ref_hi);
      m_lo[mt] = mx_lo, m_hi[mt] = mx_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
        s[mt][j][0] = exp2f(s[mt][j][0] - ref_lo);
        s[mt][j][1] = exp2f(s[mt][j][1] - ref_lo);
        s[mt][j][2] = exp2f(s[mt][j][2] - ref_hi);
        s[mt][j][3] = exp2f(s[mt][j][3] - ref_hi);
        sum_lo += s[mt][j][0] + s[mt][j][1];
        sum_hi += s[mt][j][2] + s[mt][j][3];
      }
      l_lo[mt] = l_lo[mt] * corr_lo + sum_lo;
      l_hi[mt] = l_hi[mt] * corr_hi + sum_hi;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[mt][j][0] *= corr_lo, o[mt][j][1] *= corr_lo, o[mt][j][2] *= corr_hi, o[mt][j][3] *= corr_hi;
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V(kt) is in for every thread; every warp is done with K(kt)
    if (kt + 1 < n_kt) load_tile(ks, kpool, k0 + BC);
    // O += P V: P's k dimension is the BC keys (k-steps of 16), V's n dimension is D. One
    // ldmatrix.x4.trans gives b0, b1 of two n-tiles: lanes 8i .. 8i+7 address keys
    // kk*16 + (i % 2)*8 .. +7 at columns (j + i / 2) * 8.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int j = 0; j < D / 8; j += 2) {
        uint32_t b[4];
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), col = (j + (lane >> 4)) * 8;
        ldmatrix_x4_trans(b, vs + key * LD + col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][j], a[mt], b);
          mma_16816<T>(o[mt][j + 1], a[mt], b + 2);
        }
      }
    }
  }
  // Normalise and write.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float ll = l_lo[mt], lh = l_hi[mt];
#pragma unroll
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
      ll += __shfl_xor_sync(0xffffffffu, ll, o_);
      lh += __shfl_xor_sync(0xffffffffu, lh, o_);
    }
    const float inv_lo = ll > 0.f ? 1.f / ll : 0.f, inv_hi = lh > 0.f ? 1.f / lh : 0.f;
    const int rl = r_lo[mt], rh = rl + 8;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = h * D + j * 8 + tq * 2;
      if (rl < T_)
        *reinterpret_cast<uint32_t*>(os + static_cast<size_t>(rl) * QS + col) =
            pack2<T>(o[mt][j][0] * inv_lo, o[mt][j][1] * inv_lo);
      if (rh < T_)
        *reinterpret_cast<uint32_t*>(os + static_cast<size_t>(rh) * QS + col) =
            pack2<T>(o[mt][j][2] * inv_hi, o[mt][j][3] * inv_hi);
    }
  }
}

// ------------------------------------------------------------------------------ decode
inline constexpr int kDecodeSplitAlign = 256;  // the caller's split lengths are multiples of this
inline constexpr int kDecodeThreads = 128;

// Decode tuning: per thread, kUnroll keys (16 bytes of K and of V each; 8 with an fp8 pool) per
// shared-memory stage, kStages stages in the ring, so (kStages - 1) * kUnroll * 32 bytes (fp8: 16)
// are in flight per thread while it works on one stage. The ring must fit the 48 KB of static
// shared memory (attention_decode checks). Changes speed, not results (the order of float32 sums
// within a split only).
template <int kUnroll_, int kStages_>
struct DecodeTiling {
  static constexpr int kUnroll = kUnroll_, kStages = kStages_;
  static_assert(kStages >= 2, "the ring needs a stage in flight while one is read");
};
// H100: <4, 3> (48 KB ring, 256 bytes in flight per thread) is best from 32k batch x context
// tokens; <4, 2> (32 KB) is 12-17% faster on grids of about two blocks per SM (batch 1-2).
using DecodeTilingH100 = DecodeTiling<4, 3>;

// Keys per split for a sequence of n keys on a grid of n_splits splits: the keys are spread over
// every split, in whole multiples of `grain` (a stage of keys), so a short context still keeps all
// of the grid's blocks busy instead of leaving the caller's 256-key splits to a few of them.
__host__ __device__ constexpr int decode_split_len(int n, int n_splits, int grain) {
  return ((n + n_splits - 1) / n_splits + grain - 1) / grain * grain;
}

// q/k norm + RoPE + the K/V write folded into attention_decode (kQk = true; decode-only steps), in
// place of qk_norm_rope_kv: every block normalises and rotates its G query heads from the qkv
// projection's float32 output, and the block whose split holds the new key (position n - 1) also
// its kv head's k, rounds k and v to T, writes them to the pools and puts them in its ring where
// the copy of that key would have landed. The cached keys are then all older than this step, so a
// block issues its first stages before pdl_wait, under the previous kernel's tail. Same arithmetic
// as qk_norm_rope_kv (shared helpers in elementwise.cuh): results are bit-identical.
struct DecodeQk {
  const float* qkv;  // [T, QD + 2 KVD] in `planes` planes `plane` elements apart
  int planes;
  long plane;
  const float* q_norm;
  const float* k_norm;
  const float2* rope;  // [positions, D/2] (cos, sin)
  float eps;
  const int* pos_of;   // per token row
  const int* slot_of;  // per token row
};

// One part (p = its m and l, a = its acc at the column) added to the weighted sums, M the max of
// every part's m. An empty part's acc was never written: select, don't multiply, so stale bits
// stay out.
__device__ __forceinline__ void decode_combine_add(float2 p, float a, float M, float& num, float& den) {
  const bool live = p.x != -INFINITY;
  const float w = live ? exp2f(__fsub_rn(p.x, M)) : 0.f;
  num = live ? __fmaf_rn(w, a, num) : num;
  den = __fmaf_rn(w, p.y, den);
}

// One head's attention output at column d from its n_splits parts at base .. base + n_splits - 1
// (see attention_decode): shared by attention_decode_combine and attention_decode's own combine,
// which must give the same bits, so the arithmetic is spelled out in _rn intrinsics. The parts are
// read through L2 (__ldcg): in the fused combine other blocks of the same grid wrote them.
template <int D>
__device__ __forceinline__ float decode_combine(const float* part_ml, const float* part_acc, size_t base, int n_splits,
                                                int d) {
  const float2* ml = reinterpret_cast<const float2*>(part_ml) + base;
  constexpr int kAtOnce = 8;
  if (n_splits <= kAtOnce) {
    // Every part's loads in flight at once (one L2 round trip, not one per pass), then the same
    // arithmetic in the same order as the loop below.
    float2 p[kAtOnce];
    float a[kAtOnce];
#pragma unroll
    for (int s = 0; s < kAtOnce; ++s)
      if (s < n_splits) p[s] = __ldcg(&ml[s]), a[s] = __ldcg(&part_acc[(base + s) * D + d]);
    float M = -INFINITY;
#pragma unroll
    for (int s = 0; s < kAtOnce; ++s)
      if (s < n_splits) M = fmaxf(M, p[s].x);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int s = 0; s < kAtOnce; ++s) {
      if (s >= n_splits) break;
      decode_combine_add(p[s], a[s], M, num, den);
    }
    return __fdiv_rn(num, den);
  }
  float M = -INFINITY;
#pragma unroll 8
  for (int s = 0; s < n_splits; ++s) M = fmaxf(M, __ldcg(&ml[s]).x);
  float num = 0.f, den = 0.f;
#pragma unroll 8
  for (int s = 0; s < n_splits; ++s)
    decode_combine_add(__ldcg(&ml[s]), __ldcg(&part_acc[(base + s) * D + d]), M, num, den);
  return __fdiv_rn(num, den);
}

// attention_decode's own combine (done != nullptr), in place of attention_decode_combine: the
// last of a (sequence, kv head)'s n_splits blocks to finish, found by a counter, combines its G
// heads' parts into out_row (the heads' D columns each) and resets the counter for the next launch.
// One kernel and its launch gap less per layer; the same bits as attention_decode_combine.
template <class T, int D, int G>
__device__ __forceinline__ void decode_combine_last(const float* part_ml, const float* part_acc, size_t base,
                                                    int n_splits, int* done, T* out_row) {
  __threadfence();  // this block's parts reach L2 before it counts itself finished
  const bool last = __syncthreads_or(threadIdx.x == 0 && atomicAdd(done, 1) == n_splits - 1);
  if (!last) return;
  __threadfence();  // and every other block's parts are seen after the count that said so
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    out_row[idx] = from_f32<T>(decode_combine<D>(part_ml, part_acc, base + static_cast<size_t>(g) * n_splits, n_splits, d));
  }
  if (threadIdx.x == 0) *done = 0;
}

// Partial results per (sequence, head, split): m (max of scaled logits, log2 domain), l (sum),
// acc[D]. part index = (j * n_heads + h) * n_splits + split, j the decode list index,
// n_splits = gridDim.x. Every block writes its parts (m = -inf where it had no keys).
// split_keys (the caller's split length for the largest context) only bounds decode_split_len.
// kQk: q and the new k / v come from qk (DecodeQk) instead of q and the pools; q is then unused.
// done (n_kv counters per decode list entry, zero before the first launch) != nullptr: the
// kernel combines the parts itself (decode_combine_last) into out, [token rows, n_heads * D]; with
// one split (a batch that fills the GPU) its block's part is the output, written directly with the
// combine's arithmetic (no parts in global memory, no fence or counter).
template <class T, int D, int G, class Tiling = DecodeTilingH100, bool kQk = false, class KV = T>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode(
    const T* __restrict__ q, KV* __restrict__ kpool, KV* __restrict__ vpool, const SeqMeta* __restrict__ seqs,
    const int* __restrict__ dec_list, const int* __restrict__ bt, int bs_log2, int n_kv, int split_keys,
    float scale_log2, float* __restrict__ part_ml, float* __restrict__ part_acc, DecodeQk qk, int* __restrict__ done,
    T* __restrict__ out) {
  pdl_trigger();
  static_assert(D % 8 == 0 && D <= 256, "head_dim");
  constexpr int L = D / 8;                // lanes per key (16 bytes each)
  constexpr int NG = kDecodeThreads / L;  // lane groups per block
  constexpr int U = Tiling::kUnroll, S = Tiling::kStages;
  constexpr int KPS = NG * U;  // keys per stage
  // ring[stage][u][K or V][thread]: each thread's pieces (16 bytes, fp8 8), so a warp's reads are
  // contiguous. After the loop the merge reuses the memory for sm_acc[NG][G][D] and sm_ml[NG][G][2].
  using Piece = KvPiece<KV>;
  constexpr size_t kRingBytes = sizeof(Piece) * S * U * 2 * kDecodeThreads;
  constexpr size_t kMergeBytes = sizeof(float) * NG * G * (D + 2);
  __shared__ __align__(16) unsigned char smem_raw[kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes];
  static_assert(sizeof(smem_raw) <= 48 * 1024, "static shared memory");
  Piece(*const ring)[U][2][kDecodeThreads] = reinterpret_cast<Piece(*)[U][2][kDecodeThreads]>(smem_raw);
  const int split = blockIdx.x, kvh = blockIdx.y, j = blockIdx.z, n_splits = gridDim.x;
  const int n_heads = n_kv * G;
  // NOTE: the step's metadata (seqs, dec_list, bt) is uploaded before the step's first kernel and
  // no kernel writes it, so it is read before pdl_wait(), overlapping the previous kernel's tail;
  // q and the pools (this token's q, k, v) come from the kernel before, so they wait.
  const SeqMeta sq = seqs[dec_list[j]];
  const int* table = bt + sq.bt_off;
  const int n = sq.pos0 + 1;  // this token's key is already in the cache
  const int len = min(decode_split_len(n, n_splits, KPS), split_keys);
  const int k0 = split * len, k1 = min(n, k0 + len);
  const size_t head0 = (static_cast<size_t>(j) * n_heads + kvh * G) * n_splits;  // part of (head kvh*G, split 0)
  T* const out_row = out + static_cast<size_t>(sq.q_start) * n_heads * D + kvh * G * D;  // with done only
  const bool direct = done != nullptr && n_splits == 1;
  auto finish = [&] {
    if (done != nullptr && !direct)
      decode_combine_last<T, D, G>(part_ml, part_acc, head0, n_splits, done + j * n_kv + kvh, out_row);
  };
  if (k0 >= k1) {
    pdl_wait();
    if (threadIdx.x < G) {
      const size_t part = head0 + static_cast<size_t>(threadIdx.x) * n_splits + split;
      part_ml[2 * part] = -INFINITY, part_ml[2 * part + 1] = 0.f;
    }
    finish();
    return;
  }
  const int tid = threadIdx.x, sub = tid % L, grp = tid / L;
  const int KS = n_kv * D, col = kvh * D + sub * 8;
  const int n_st = (k1 - k0 + KPS - 1) / KPS;
  // Stage st holds keys k0 + st*KPS + grp*U + u: their cache slots (-1 past k1), then the copies.
  // Keys past k1 are zero-filled (their logits are masked, and p = 0 must not meet stale or
  // uninitialised bits); stages past the split issue no copies, only an empty group, so the wait
  // count stays fixed.
  // With kQk the new key (n - 1) is not copied: its ring entries are written from registers.
  const int k_end = kQk ? min(k1, n - 1) : k1;
  auto stage_slots = [&](int st, int (&sl)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = k0 + st * KPS + grp * U + u;
      sl[u] = st < n_st && key < k_end ? static_cast<int>(kv_slot(table, key, bs_log2)) : -1;
    }
  };
  auto copy_stage = [&](int st, const int (&sl)[U]) {
    if (st < n_st) {
      const int slot = st % S;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool ok = sl[u] >= 0;
        const size_t off = ok ? static_cast<size_t>(sl[u]) * KS + col : 0;
        attn::cp_async_piece<KV>(&ring[slot][u][0][tid], kpool + off, ok);
        attn::cp_async_piece<KV>(&ring[slot][u][1][tid], vpool + off, ok);
      }
    }
    cp_async_commit();
  };
  int first[S - 1][U];
#pragma unroll
  for (int st = 0; st < S - 1; ++st) stage_slots(st, first[st]);
  if constexpr (kQk) {
#pragma unroll
    for (int st = 0; st < S - 1; ++st) copy_stage(st, first[st]);  // keys of earlier steps only
  }
  pdl_wait();
  if constexpr (!kQk) {
#pragma unroll
    for (int st = 0; st < S - 1; ++st) copy_stage(st, first[st]);
  }

  float qf[G][8];
  // kQk: the new key's ring position (stage, lane group, unroll index) and its k / v pieces for
  // this thread's 8 columns, in the ring's 16-byte form.
  const int new_rel = n - 1 - k0;
  const bool owner = kQk && new_rel < k1 - k0;  // this split holds the new key
  const int new_st = new_rel / KPS, new_grp = (new_rel % KPS) / U, new_u = new_rel % U;
  Piece k_new{}, v_new{};
  if constexpr (kQk) {
    // block_sum's scratch: the ring's last stage, which no copy has been issued into yet (the ring
    // already fills the 48 KB of static shared memory); the barrier at the end of this block keeps
    // it so until every thread is done with it.
    float* shm = reinterpret_cast<float*>(&ring[S - 1][0][0][0]);
    const int QD = n_heads * D, KVD = n_kv * D;
    const int t = sq.q_start;
    const float* row = qk.qkv + static_cast<size_t>(t) * (QD + 2 * KVD);
    const float2 r = qk_inv_rms<8>(row, QD, KVD, true, owner, qk.planes, qk.plane, qk.eps, shm);
    const float2* cs = qk.rope + static_cast<size_t>(qk.pos_of[t]) * (D / 2);
    // This thread's columns sub*8 .. sub*8+7: the lo or hi halves of units j0 and j0 + 4.
    const bool hi_half = sub * 8 >= D / 2;
    const int j0 = hi_half ? sub * 8 - D / 2 : sub * 8;
    auto rotated = [&](const float* hv, const float* nw, float rn, float* out8) {
      float4 lo0, hi0, lo1, hi1;
      qk_rope_unit<D>(hv, nw, cs, j0, rn, qk.planes, qk.plane, lo0, hi0);
      qk_rope_unit<D>(hv, nw, cs, j0 + 4, rn, qk.planes, qk.plane, lo1, hi1);
      const float4 x0 = hi_half ? hi0 : lo0, x1 = hi_half ? hi1 : lo1;
      out8[0] = x0.x, out8[1] = x0.y, out8[2] = x0.z, out8[3] = x0.w;
      out8[4] = x1.x, out8[5] = x1.y, out8[6] = x1.z, out8[7] = x1.w;
    };
    auto pack8 = [](const float* f) {
      return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
    };
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int h = kvh * G + g;
      float f[8];
      rotated(row + h * D, qk.q_norm + h * D, r.x, f);
      attn::unpack8_reg<T>(pack8(f), qf[g]);  // q rounded to T, as qk_norm_rope_kv stores it
    }
    if (owner && grp == new_grp) {
      float f[8];
      rotated(row + QD + kvh * D, qk.k_norm + kvh * D, r.y, f);
      k_new = attn::pack8_kv<T, KV>(f);
      const float4 va = load4_planes(row + QD + KVD + kvh * D + sub * 8, qk.planes, qk.plane);
      const float4 vb = load4_planes(row + QD + KVD + kvh * D + sub * 8 + 4, qk.planes, qk.plane);
      const float vf8[8] = {va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w};
      v_new = attn::pack8_kv<T, KV>(vf8);
      const size_t dst = static_cast<size_t>(qk.slot_of[t]) * KS + col;
      *reinterpret_cast<Piece*>(kpool + dst) = k_new;
      *reinterpret_cast<Piece*>(vpool + dst) = v_new;
    }
    __syncthreads();  // shm (ring stage S - 1) is free for the loop's copies
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g)
      attn::unpack8_reg<T>(__ldg(reinterpret_cast<const uint4*>(q + static_cast<size_t>(sq.q_start) * n_heads * D +
                                                                (kvh * G + g) * D + sub * 8)),
                           qf[g]);
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  // Every lane runs the same stages (the shuffles below need the whole warp); keys past k1 are
  // masked.
  for (int st = 0; st < n_st; ++st) {
    // NOTE: the slot refilled here was read by this same thread in the previous stage (its loads
    // completed when their values were used), and no other thread reads it: no barrier.
    {
      int sl[U];
      stage_slots(st + S - 1, sl);
      copy_stage(st + S - 1, sl);
    }
    attn::wait_own_copies<S - 1>();  // this thread's copies for stage st have landed
    const int slot = st % S;
    if (kQk && owner && st == new_st && grp == new_grp) {
      // The new key's entries (zero-filled by its masked copy, which has landed) from registers.
      ring[slot][new_u][0][tid] = k_new;
      ring[slot][new_u][1][tid] = v_new;
    }
    float kf[U][8], vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      attn::unpack8_kv<T, KV>(ring[slot][u][0][tid], kf[u]);
      attn::unpack8_kv<T, KV>(ring[slot][u][1][tid], vf[u]);
    }
    const int kb = k0 + st * KPS + grp * U;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s[U];
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[u][e], d);
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u] = kb + u < k1 ? d * scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[u]);
      }
      // A lane group with no valid key yet keeps m = -inf: 0 as the reference avoids inf - inf.
      const float ref = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2f(m[g] - ref);
      m[g] = mx;
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = exp2f(s[u] - ref);
        l[g] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[u][e], acc[g][e]);
      }
    }
  }
  // Merge the lane groups (in the ring's memory, once every thread is done with it).
  attn::wait_own_copies<0>();
  __syncthreads();
  float (*sm_acc)[G][D] = reinterpret_cast<float (*)[G][D]>(smem_raw);
  float (*sm_ml)[G][2] = reinterpret_cast<float (*)[G][2]>(&sm_acc[NG][0][0]);
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[grp][g][sub * 8 + e] = acc[g][e];
    if (sub == 0) sm_ml[grp][g][0] = m[g], sm_ml[grp][g][1] = l[g];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += kDecodeThreads) {
    const int g = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int r = 0; r < NG; ++r) M = fmaxf(M, sm_ml[r][g][0]);
    float a = 0.f, s = 0.f;
#pragma unroll
    for (int r = 0; r < NG; ++r) {
      const float mr = sm_ml[r][g][0];
      if (mr == -INFINITY) continue;
      const float w = exp2f(mr - M);
      a += w * sm_acc[r][g][d];
      s += w * sm_ml[r][g][1];
    }
    if (direct) {
      // decode_combine of this one part (its max is its own m).
      float num = 0.f, den = 0.f;
      decode_combine_add(make_float2(M, s), a, M, num, den);
      out_row[idx] = from_f32<T>(__fdiv_rn(num, den));
    } else {
      const size_t part = head0 + static_cast<size_t>(g) * n_splits + split;
      part_acc[part * D + d] = a;
      if (d == 0) part_ml[2 * part] = M, part_ml[2 * part + 1] = s;
    }
  }
  finish();
}

// fp8 K/V cache, prefill: the prefill attentions read 16-bit K/V from staging pools. A prefill
// piece's own keys reach its staging from qk_norm_rope_kv; this copies its earlier keys, positions
// 0 .. pos0 - 1 (chunked prompts, prefix-cache hits), from the e4m3 pools (through seqs' block
// tables) to the staging pools (through st_seqs' tables), exactly (e4m3 values are 16-bit values).
// pf lists the pieces with pos0 > 0. Grid (pf entries, any), kStageThreads threads; a work item is
// 16 values of one slot row (row = KVD values), kStageBatch items loaded before any is stored.
inline constexpr int kStageThreads = 256;
template <class T>
__global__ void __launch_bounds__(kStageThreads) kv_stage_gather(
    const kv_fp8* __restrict__ kpool, const kv_fp8* __restrict__ vpool, const SeqMeta* __restrict__ seqs,
    const SeqMeta* __restrict__ st_seqs, const int* __restrict__ pf, const int* __restrict__ bt,
    const int* __restrict__ st_bt, int bs_log2, int row, T* __restrict__ kst, T* __restrict__ vst) {
  constexpr int kStageBatch = 4;
  pdl_trigger();
  const int s = pf[blockIdx.x];
  const SeqMeta sq = seqs[s], st = st_seqs[s];
  pdl_wait();  // the staging pools are free once the kernels before are done with them
  const int per_row = row / 16;
  const long items = static_cast<long>(sq.pos0) * per_row, stride = static_cast<long>(gridDim.y) * blockDim.x;
  for (long w0 = static_cast<long>(blockIdx.y) * blockDim.x + threadIdx.x; w0 < items; w0 += stride * kStageBatch) {
    uint4 kv[kStageBatch][2];
    size_t dst[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const long w = w0 + u * stride;
      if (w >= items) break;
      const int p = static_cast<int>(w / per_row), c = static_cast<int>(w % per_row) * 16;
      const size_t src = kv_slot(bt + sq.bt_off, p, bs_log2) * row + c;
      dst[u] = kv_slot(st_bt + st.bt_off, p, bs_log2) * row + c;
      kv[u][0] = *reinterpret_cast<const uint4*>(kpool + src);
      kv[u][1] = *reinterpret_cast<const uint4*>(vpool + src);
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      if (w0 + u * stride >= items) break;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        T* d = (h == 0 ? kst : vst) + dst[u];
        const uint4 b = kv[u][h];
        const uint2 a0 = widen_fp8x4<T>(b.x), a1 = widen_fp8x4<T>(b.y), a2 = widen_fp8x4<T>(b.z),
                    a3 = widen_fp8x4<T>(b.w);
        *reinterpret_cast<uint4*>(d) = make_uint4(a0.x, a0.y, a1.x, a1.y);
        *reinterpret_cast<uint4*>(d + 8) = make_uint4(a2.x, a2.y, a3.x, a3.y);
      }
    }
  }
}

// grid (decode list, n_heads), D threads. Reads every split's part (empty ones have m = -inf), so
// it needs no split lengths; split_keys is kept for the launch contract.
template <class T, int D>
__global__ void attention_decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                         const SeqMeta* __restrict__ seqs, const int* __restrict__ dec_list,
                                         int n_splits, int split_keys, T* __restrict__ out) {
  pdl_trigger();
  (void)split_keys;
  const int j = blockIdx.x, h = blockIdx.y, n_heads = gridDim.y;
  const size_t base = (static_cast<size_t>(j) * n_heads + h) * n_splits;
  const int q_row = seqs[dec_list[j]].q_start;  // metadata: before the wait (see attention_decode)
  pdl_wait();
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    out[static_cast<size_t>(q_row) * n_heads * D + h * D + d] =
        from_f32<T>(decode_combine<D>(part_ml, part_acc, base, n_splits, d));
}

}  // namespace afs::cuda
