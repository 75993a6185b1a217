// Causal attention over the KV cache on the GPU (GQA: query head h reads kv head h / group).
//
// Layouts: q [T, n_heads, D] (rows for positions pos0 .. pos0+T-1, pos0 = *len before this
// forward), K/V cache [ctx, n_kv, D], out [T, n_heads, D]; all 16-bit storage, float32 math.
//
//  * attention_prefill: FlashAttention-2 style. A block of 4 warps owns 64 query rows of one head;
//    each warp 16 rows. Key tiles of 64 go through shared memory; S = Q K^T and O += P V run on
//    tensor cores (mma.sync m16n8k16), softmax is online in registers (exp2 with log2e folded into
//    the scale). The S accumulator fragments are reused directly as the A operand of P V.
//  * attention_decode + attention_decode_combine: one query row per head (decode). The sequence is
//    split into chunks of kDecodeSplit keys, one block per (chunk, head); blocks past the current
//    length exit at once, so the grid is fixed and the kernel can live in a CUDA graph.
#pragma once

#include "afs/kernels/cuda/common.cuh"
#include "afs/kernels/cuda/linear.cuh"

namespace afs::cuda {

namespace attn {
constexpr int kBr = 64, kBc = 64, kWarps = 4;
}  // namespace attn

template <class T, int D>
__global__ void __launch_bounds__(128) attention_prefill(const T* __restrict__ q, const T* __restrict__ kc,
                                                         const T* __restrict__ vc, const int* __restrict__ len,
                                                         int T_, int n_heads, int n_kv, float scale_log2,
                                                         T* __restrict__ out) {
  using namespace attn;
  constexpr int LD = D + 8;  // padded smem row (elements)
  __shared__ __align__(16) T ks[kBc * LD];
  __shared__ __align__(16) T vs[kBc * LD];
  const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
  const int q0 = blockIdx.x * kBr;  // first query row (within this forward) of the block
  const int pos0 = *len;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int QS = n_heads * D, KS = n_kv * D;

  // Q fragments for this warp's 16 rows, all of D.
  const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + tq * 2;
    auto ld = [&](int r, int col) -> uint32_t {
      return r < T_ ? *reinterpret_cast<const uint32_t*>(q + static_cast<size_t>(r) * QS + h * D + col) : 0u;
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

  // Keys needed by the block: 0 .. pos0 + min(q0 + kBr, T_) - 1.
  const int kend = pos0 + min(q0 + kBr, T_);
  for (int k0 = 0; k0 < kend; k0 += kBc) {
    __syncthreads();
    for (int c = threadIdx.x; c < kBc * (D / 8); c += blockDim.x) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool valid = k0 + r < kend;
      const size_t off = static_cast<size_t>(k0 + r) * KS + kvh * D + col;
      uint4 kv = valid ? *reinterpret_cast<const uint4*>(kc + off) : make_uint4(0, 0, 0, 0);
      uint4 vv = valid ? *reinterpret_cast<const uint4*>(vc + off) : make_uint4(0, 0, 0, 0);
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
      *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(r_lo) * QS + col) = pack2<T>(o[j][0] * inv_lo, o[j][1] * inv_lo);
    if (r_hi < T_)
      *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(r_hi) * QS + col) = pack2<T>(o[j][2] * inv_hi, o[j][3] * inv_hi);
  }
}

// ------------------------------------------------------------------------------ decode
inline constexpr int kDecodeSplit = 256;  // keys per block

// Partial results per (split, head): m (max of scaled logits, log2 domain), l (sum), acc[D].
template <class T, int D>
__global__ void __launch_bounds__(128) attention_decode(const T* __restrict__ q, const T* __restrict__ kc,
                                                        const T* __restrict__ vc, const int* __restrict__ len,
                                                        int n_heads, int n_kv, float scale_log2,
                                                        float* __restrict__ part_ml, float* __restrict__ part_acc) {
  static_assert(D % 8 == 0 && D <= 256, "head_dim");
  constexpr int kLanesPerKey = D / 8;  // 16 bytes per lane
  constexpr int kKeysPerPass = 128 / kLanesPerKey;
  __shared__ float p[kDecodeSplit];
  __shared__ float shm[32];
  const int split = blockIdx.x, h = blockIdx.y, kvh = h / (n_heads / n_kv);
  const int n = *len + 1;  // this token's key is already in the cache
  const int k0 = split * kDecodeSplit, k1 = min(n, k0 + kDecodeSplit);
  const size_t part = static_cast<size_t>(h) * gridDim.x + split;
  if (k0 >= k1) {
    if (threadIdx.x == 0) part_ml[2 * part] = -INFINITY, part_ml[2 * part + 1] = 0.f;
    return;
  }
  const int sub = threadIdx.x % kLanesPerKey, kk = threadIdx.x / kLanesPerKey;
  float qf[8];
  unpack8<T>(*reinterpret_cast<const uint4*>(q + static_cast<size_t>(h) * D + sub * 8), qf);
  const int KS = n_kv * D;
  for (int key = k0 + kk; key < k0 + kDecodeSplit; key += kKeysPerPass) {
    float s = 0.f;
    if (key < k1) {
      float kf[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(kc + static_cast<size_t>(key) * KS + kvh * D + sub * 8), kf);
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(qf[e], kf[e], s);
    }
#pragma unroll
    for (int o = kLanesPerKey / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (sub == 0 && key < k0 + kDecodeSplit) p[key - k0] = key < k1 ? s * scale_log2 : -INFINITY;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < kDecodeSplit; i += blockDim.x) mx = fmaxf(mx, p[i]);
  mx = block_max(mx, shm);
  float sum = 0.f;
  for (int i = threadIdx.x; i < kDecodeSplit; i += blockDim.x) {
    const float e = exp2f(p[i] - mx);
    p[i] = e;
    sum += e;
  }
  sum = block_sum(sum, shm);  // includes a __syncthreads, so p[] is visible
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int key = k0; key < k1; ++key)
      acc = fmaf(p[key - k0], to_f32(vc[static_cast<size_t>(key) * KS + kvh * D + d]), acc);
    part_acc[part * D + d] = acc;
  }
  if (threadIdx.x == 0) part_ml[2 * part] = mx, part_ml[2 * part + 1] = sum;
}

template <class T, int D>
__global__ void attention_decode_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                         int n_splits, T* __restrict__ out) {
  const int h = blockIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_ml[2 * (static_cast<size_t>(h) * n_splits + s)]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < n_splits; ++s) {
      const size_t part = static_cast<size_t>(h) * n_splits + s;
      const float m = part_ml[2 * part];
      if (m == -INFINITY) continue;
      const float w = exp2f(m - M);
      num += w * part_acc[part * D + d];
      den += w * part_ml[2 * part + 1];
    }
    out[static_cast<size_t>(h) * D + d] = from_f32<T>(num / den);
  }
}

}  // namespace afs::cuda
