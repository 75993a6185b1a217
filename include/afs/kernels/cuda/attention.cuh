// Causal attention over the paged KV cache on the GPU (GQA: query head h reads kv head h / G).
//
// Layouts: q [T, n_heads, D] (the step's token rows), out the same; the layer's K and V pools are
// [slots, n_kv, D] with slot = block * block_size + position % block_size, block = the sequence's
// block table entry for position / block_size (block_size a power of two). 16-bit storage,
// float32 math. Every kernel reads the step's metadata (SeqMeta, block tables) from the device, so
// a captured step replays for any positions and block tables.
//
//  * attention_prefill: FlashAttention-2 style over tiles of 64 query rows of one sequence chunk
//    (tiles[i] = {sequence, first row}), 4 warps of 16 rows. Key tiles of 64 are gathered through
//    the block table into shared memory; S = Q K^T and O += P V run on tensor cores (mma.sync
//    m16n8k16), softmax is online in registers (exp2, log2e folded into the scale). The S
//    accumulators are reused directly as the A operand of P V.
//  * attention_decode + attention_decode_combine: one query row per sequence (decode tokens). A
//    block owns (key split, kv head, sequence) and all G query heads of the group, so each K/V row
//    is read once per group: D/8 lanes hold 16 bytes of a key, the block's 128/(D/8) lane groups
//    walk the split's keys with an online softmax, then merge in shared memory. The context is cut
//    into as many splits as it takes to fill the GPU at this batch size (one for large batches);
//    splits past a sequence's length exit at once, so the grid is fixed and lives in CUDA graphs.
#pragma once

#include "afs/kernels/cuda/common.cuh"
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
constexpr int kBr = 64, kBc = 64, kWarps = 4;
}  // namespace attn

template <class T, int D>
__global__ void __launch_bounds__(128) attention_prefill(const T* __restrict__ q, const T* __restrict__ kpool,
                                                         const T* __restrict__ vpool, const SeqMeta* __restrict__ seqs,
                                                         const int2* __restrict__ tiles, const int* __restrict__ bt,
                                                         int bs_log2, int n_heads, int n_kv, float scale_log2,
                                                         T* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  using namespace attn;
  constexpr int LD = D + 8;  // padded smem row (elements)
  __shared__ __align__(16) T ks[kBc * LD];
  __shared__ __align__(16) T vs[kBc * LD];
  const int2 tile = tiles[blockIdx.x];
  const SeqMeta sq = seqs[tile.x];
  const int* table = bt + sq.bt_off;
  const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
  const int q0 = tile.y;  // first query row of the tile within the sequence chunk
  const int T_ = sq.n, pos0 = sq.pos0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int QS = n_heads * D, KS = n_kv * D;
  const T* qs = q + static_cast<size_t>(sq.q_start) * QS;
  T* os = out + static_cast<size_t>(sq.q_start) * QS;

  // Q fragments for this warp's 16 rows, all of D.
  const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + tq * 2;
    auto ld = [&](int r, int col) -> uint32_t {
      return r < T_ ? *reinterpret_cast<const uint32_t*>(qs + static_cast<size_t>(r) * QS + h * D + col) : 0u;
    };
    qf[kk][0] = ld(r_lo, c);
    qf[kk][1] = ld(r_hi, c);
    qf[kk][2] = ld(r_lo, c + 8);
    qf[kk][3] = ld(r_hi, c + 8);
  }
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  const int qpos_lo = pos0 + r_lo, qpos_hi = pos0 + r_hi;

  // Keys needed by the tile: 0 .. pos0 + min(q0 + kBr, T_) - 1.
  const int kend = pos0 + min(q0 + kBr, T_);
  for (int k0 = 0; k0 < kend; k0 += kBc) {
    __syncthreads();
    for (int c = threadIdx.x; c < kBc * (D / 8); c += blockDim.x) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool valid = k0 + r < kend;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (valid) {
        const size_t off = kv_slot(table, k0 + r, bs_log2) * KS + kvh * D + col;
        kv = *reinterpret_cast<const uint4*>(kpool + off);
        vv = *reinterpret_cast<const uint4*>(vpool + off);
      }
      *reinterpret_cast<uint4*>(ks + r * LD + col) = kv;
      *reinterpret_cast<uint4*>(vs + r * LD + col) = vv;
    }
    __syncthreads();
    // S = Q K^T for 16 rows x 64 keys: 8 n-tiles.
    float s[kBc / 8][4];
#pragma unroll
    for (int j = 0; j < kBc / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t b[2];
        const T* kr = ks + (j * 8 + g) * LD + kk * 16 + tq * 2;
        b[0] = *reinterpret_cast<const uint32_t*>(kr);
        b[1] = *reinterpret_cast<const uint32_t*>(kr + 8);
        mma_16816<T>(s[j], qf[kk], b);
      }
    }
    // Mask (causal and past-the-end) and online softmax.
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int j = 0; j < kBc / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + tq * 2 + (e & 1);
        const int qp = e < 2 ? qpos_lo : qpos_hi;
        float v = s[j][e] * scale_log2;
        if (key > qp || key >= kend) v = -INFINITY;
        s[j][e] = v;
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[j][0], s[j][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o_));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o_));
    }
    // Rows with every key masked so far keep max -inf: use 0 as the reference to avoid inf - inf.
    const float ref_lo = mx_lo == -INFINITY ? 0.f : mx_lo, ref_hi = mx_hi == -INFINITY ? 0.f : mx_hi;
    const float corr_lo = exp2f(m_lo - ref_lo), corr_hi = exp2f(m_hi - ref_hi);
    m_lo = mx_lo, m_hi = mx_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < kBc / 8; ++j) {
      s[j][0] = exp2f(s[j][0] - ref_lo);
      s[j][1] = exp2f(s[j][1] - ref_lo);
      s[j][2] = exp2f(s[j][2] - ref_hi);
      s[j][3] = exp2f(s[j][3] - ref_hi);
      sum_lo += s[j][0] + s[j][1];
      sum_hi += s[j][2] + s[j][3];
    }
    l_lo = l_lo * corr_lo + sum_lo;
    l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= corr_lo, o[j][1] *= corr_lo, o[j][2] *= corr_hi, o[j][3] *= corr_hi;
    }
    // O += P V: P's k dimension is the 64 keys (4 k-steps of 16), V's n dimension is D.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        // b0 = V[key 2t, 2t+1][d g], b1 = V[key 2t+8, 2t+9][d g] within this k-step.
        const int key = kk * 16 + tq * 2, d = j * 8 + g;
        const uint16_t* vb = reinterpret_cast<const uint16_t*>(vs);
        uint32_t b[2];
        b[0] = static_cast<uint32_t>(vb[key * LD + d]) | (static_cast<uint32_t>(vb[(key + 1) * LD + d]) << 16);
        b[1] = static_cast<uint32_t>(vb[(key + 8) * LD + d]) | (static_cast<uint32_t>(vb[(key + 9) * LD + d]) << 16);
        mma_16816<T>(o[j], a, b);
      }
    }
  }
  // Normalise and write.
#pragma unroll
  for (int o_ = 1; o_ < 4; o_ <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o_);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o_);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = h * D + j * 8 + tq * 2;
    if (r_lo < T_)
      *reinterpret_cast<uint32_t*>(os + static_cast<size_t>(r_lo) * QS + col) = pack2<T>(o[j][0] * inv_lo, o[j][1] * inv_lo);
    if (r_hi < T_)
      *reinterpret_cast<uint32_t*>(os + static_cast<size_t>(r_hi) * QS + col) = pack2<T>(o[j][2] * inv_hi, o[j][3] * inv_hi);
  }
}

// ------------------------------------------------------------------------------ decode
inline constexpr int kDecodeSplitAlign = 256;  // split lengths are multiples of this
inline constexpr int kDecodeThreads = 128;
inline constexpr int kDecodeUnroll = 4;  // keys in flight per lane group

// Partial results per (sequence, head, split): m (max of scaled logits, log2 domain), l (sum),
// acc[D]. part index = (j * n_heads + h) * n_splits + split, j the decode list index.
template <class T, int D, int G>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode(
    const T* __restrict__ q, const T* __restrict__ kpool, const T* __restrict__ vpool,
    const SeqMeta* __restrict__ seqs, const int* __restrict__ dec_list, const int* __restrict__ bt, int bs_log2,
    int n_kv, int split_keys, float scale_log2, float* __restrict__ part_ml, float* __restrict__ part_acc) {
  pdl_trigger();
  pdl_wait();
  static_assert(D % 8 == 0 && D <= 256, "head_dim");
  constexpr int L = D / 8;                   // lanes per key (16 bytes each)
  constexpr int NG = kDecodeThreads / L;     // lane groups per block
  constexpr int U = kDecodeUnroll;
  __shared__ float sm_ml[NG][G][2];
  __shared__ float sm_acc[NG][G][D];
  const int split = blockIdx.x, kvh = blockIdx.y, j = blockIdx.z, n_splits = gridDim.x;
  const int n_heads = n_kv * G;
  const SeqMeta sq = seqs[dec_list[j]];
  const int* table = bt + sq.bt_off;
  const int n = sq.pos0 + 1;  // this token's key is already in the cache
  const int k0 = split * split_keys, k1 = min(n, k0 + split_keys);
  if (k0 >= k1) {
    if (threadIdx.x < G) {
      const size_t part = (static_cast<size_t>(j) * n_heads + kvh * G + threadIdx.x) * n_splits + split;
      part_ml[2 * part] = -INFINITY, part_ml[2 * part + 1] = 0.f;
    }
    return;
  }
  const int sub = threadIdx.x % L, grp = threadIdx.x / L;
  const int KS = n_kv * D;
  float qf[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
    unpack8<T>(*reinterpret_cast<const uint4*>(q + static_cast<size_t>(sq.q_start) * n_heads * D +
                                               (kvh * G + g) * D + sub * 8), qf[g]);
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  // Every lane runs the same passes (the shuffles below need the whole warp); keys past k1 are
  // masked.
  for (int base = k0 + grp; base - grp < k1; base += NG * U) {
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * NG;
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      if (key < k1) {
        const size_t off = kv_slot(table, key, bs_log2) * KS + kvh * D + sub * 8;
        kr[u] = *reinterpret_cast<const uint4*>(kpool + off);
        vr[u] = *reinterpret_cast<const uint4*>(vpool + off);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s[U];
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[8];
        unpack8<T>(kr[u], kf);
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u] = base + u * NG < k1 ? d * scale_log2 : -INFINITY;
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
        float vf[8];
        unpack8<T>(vr[u], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
      }
    }
  }
  // Merge the lane groups.
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
    const size_t part = (static_cast<size_t>(j) * n_heads + kvh * G + g) * n_splits + split;
    part_acc[part * D + d] = a;
    if (d == 0) part_ml[2 * part] = M, part_ml[2 * part + 1] = s;
  }
}

// grid (decode list, n_heads), D threads.
template <class T, int D>
__global__ void attention_decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                         const SeqMeta* __restrict__ seqs, const int* __restrict__ dec_list,
                                         int n_splits, int split_keys, T* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  const int j = blockIdx.x, h = blockIdx.y, n_heads = gridDim.y;
  const SeqMeta sq = seqs[dec_list[j]];
  const int used = min(n_splits, (sq.pos0 + split_keys) / split_keys);  // ceil((pos0 + 1) / split)
  const size_t base = (static_cast<size_t>(j) * n_heads + h) * n_splits;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, part_ml[2 * (base + s)]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < used; ++s) {
      const float m = part_ml[2 * (base + s)];
      if (m == -INFINITY) continue;
      const float w = exp2f(m - M);
      num += w * part_acc[(base + s) * D + d];
      den += w * part_ml[2 * (base + s) + 1];
    }
    out[static_cast<size_t>(sq.q_start) * n_heads * D + h * D + d] = from_f32<T>(num / den);
  }
}

}  // namespace afs::cuda
