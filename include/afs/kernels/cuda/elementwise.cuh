// Row-wise kernels of the OLMo 2 forward on the GPU. One block of kRowThreads per token row;
// float32 math. (The MLP's SwiGLU lives in the gate/up GEMM's epilogue, see linear.cuh.)
//   embed_gather          x[t] = embed[tok[t]] (float32 residual) and xa[t] = x[t] (GEMM input type)
//   rms_norm_residual     x[t] += rmsnorm(h[t]) * w ; xa[t] = x[t]   (h float32 or 16-bit)
//   rms_norm_cast         out[i] = rmsnorm(x[rows[i]]) * w   (final norm before lm_head)
#pragma once

#include <algorithm>

#include "afs/kernels/cuda/common.cuh"

namespace afs::cuda {

inline constexpr int kRowThreads = 1024;  // a decode step has one row: use a whole block on it

template <class T>
__global__ void embed_gather(const int32_t* __restrict__ tokens, const T* __restrict__ embed, int H,
                             float* __restrict__ x, T* __restrict__ xa) {
  pdl_trigger();
  pdl_wait();
  const int t = blockIdx.x;
  const T* e = embed + static_cast<size_t>(tokens[t]) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const T v = e[i];
    x[static_cast<size_t>(t) * H + i] = to_f32(v);
    xa[static_cast<size_t>(t) * H + i] = v;
  }
}

// Four 16-bit values from four floats, in one 8-byte store.
template <class T>
__device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(a, b), pack2<T>(c, d));
}

// Four e4m3 bytes (the low byte first) as four 16-bit T values in one 8-byte word: exact (every
// e4m3 value is a half and a bfloat16 value), through f16x2.
template <class T>
__device__ __forceinline__ uint2 widen_fp8x4(uint32_t w) {
  float f[4];
  fp8x4_to_f32(w, f);
  return make_uint2(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]));
}

// Four values into a K/V pool of type KV (16-bit: store4; fp8: four e4m3 bytes in one 4-byte
// store); with an fp8 pool and a 16-bit staging row (st, may be null), the stored e4m3 values also
// go there widened to T, so both hold the same values.
template <class T, class KV>
__device__ __forceinline__ void store4_kv(KV* dst, T* st, float a, float b, float c, float d) {
  if constexpr (kIsFp8Kv<KV>) {
    const uint32_t w = fp8x4(a, b, c, d);
    *reinterpret_cast<uint32_t*>(dst) = w;
    if (st) *reinterpret_cast<uint2*>(st) = widen_fp8x4<T>(w);
  } else {
    store4<KV>(dst, a, b, c, d);
  }
}

// Four values at p summed over `planes` planes `plane` elements apart (a K-split GEMM's parts, see
// linear_planes), in plane order.
template <class Y>
__device__ __forceinline__ float4 load4_planes(const Y* p, int planes, long plane) {
  float4 v = load4(p);
  for (int i = 1; i < planes; ++i) {
    const float4 u = load4(p + i * plane);
    v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
  }
  return v;
}

// H % 8 == 0 (the engine's GEMMs require it of every K): rows are read 4 values at a time. The
// first V groups of 4 of each thread, of h and of x, stay in registers between the two passes,
// and x is loaded with h, before the reduction, so both streams are in flight at once. h is the
// GEMM's output: float32 (in `planes` planes, see linear_planes), or 16-bit in prefill-sized steps.
// Launch with rms_norm_threads(H, V).
template <class T, class Y, int V>
__global__ void rms_norm_residual(const Y* __restrict__ h, int planes, long plane, const float* __restrict__ w, int H,
                                  float eps, float* __restrict__ x, T* __restrict__ xa) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  const size_t row = static_cast<size_t>(blockIdx.x) * H;
  const Y* hr = h + row;
  float4* x4 = reinterpret_cast<float4*>(x + row);
  const int n4 = H / 4, tid = threadIdx.x, bd = blockDim.x;
  float4 kh[V], kx[V];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const bool in = tid + k * bd < n4;
    kh[k] = in ? load4_planes(hr + 4 * (tid + k * bd), planes, plane) : make_float4(0.f, 0.f, 0.f, 0.f);
    kx[k] = in ? x4[tid + k * bd] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) ss += kh[k].x * kh[k].x + kh[k].y * kh[k].y + kh[k].z * kh[k].z + kh[k].w * kh[k].w;
  for (int i = tid + V * bd; i < n4; i += bd) {
    const float4 v = load4_planes(hr + 4 * i, planes, plane);
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float r = rsqrtf(block_sum(ss, shm) / H + eps);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  auto update = [&](int i, const float4& hv, const float4& xv) {
    const float4 wv = w4[i];
    const float4 v = make_float4(xv.x + hv.x * r * wv.x, xv.y + hv.y * r * wv.y, xv.z + hv.z * r * wv.z,
                                 xv.w + hv.w * r * wv.w);
    x4[i] = v;
    store4<T>(xa + row + 4 * i, v.x, v.y, v.z, v.w);
  };
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (tid + k * bd < n4) update(tid + k * bd, kh[k], kx[k]);
  for (int i = tid + V * bd; i < n4; i += bd) update(i, load4_planes(hr + 4 * i, planes, plane), x4[i]);
}

// rms_norm_residual's block size for rows of H with V groups of 4 kept per thread: enough threads
// to keep the whole row (at most kRowThreads, at least 4 warps). A decode step (one block per row,
// few rows) runs V = 1: many threads on its row; a prefill step V = 4: more rows per SM in flight.
inline int rms_norm_threads(int H, int V) {
  const int per = (H / 4 + V - 1) / V;
  return std::clamp((per + 31) / 32 * 32, 128, kRowThreads);
}

// Rows rows[i] of x -> row i of out (the rows that need logits).
template <class T>
__global__ void rms_norm_cast(const float* __restrict__ x, const int* __restrict__ rows, const float* __restrict__ w,
                              int H, float eps, T* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  const size_t src = static_cast<size_t>(rows[blockIdx.x]) * H, dst = static_cast<size_t>(blockIdx.x) * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) ss += x[src + i] * x[src + i];
  const float r = rsqrtf(block_sum(ss, shm) / H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) out[dst + i] = from_f32<T>(x[src + i] * r * w[i]);
}

// ---- q/k norm + RoPE. The pieces below are shared by qk_norm_rope_kv and the decode attention
// that folds them in (attention.cuh, DecodeQk), so both compute bit-identical q, k and v.

// Every multiply and add below is an explicit _rn intrinsic: the compiler may not fuse or reorder
// them differently in the two kernels that inline these helpers, so both get the same bits.
__device__ __forceinline__ float sumsq4(const float4& v) {
  return __fmaf_rn(v.w, v.w, __fmaf_rn(v.z, v.z, __fmaf_rn(v.y, v.y, __fmul_rn(v.x, v.x))));
}

// Inverse RMS of the q part (width QD) and, when with_k, the k part (width KVD, right after it) of
// a token row: every thread of the block strides both four values at a time, then one block_sum
// each. Same thread mapping and order for any block of the same size. The loads of kBatch strides
// are issued before any of them is summed: a plain strided loop waits out one L2 round trip per
// stride (8 at QD = 4096 on 128 threads), since each load sits after the previous sum. The sums
// keep their order, so the bits do not depend on kBatch.
template <int kBatch, class Y>
__device__ __forceinline__ float qk_sum_squares(const Y* part, int n, int planes, long plane) {
  const int stride = blockDim.x * 4;
  float acc = 0.f;
  if (planes > 1) {  // K-split planes (decode-sized steps of 5+ rows): one stride at a time
    for (int i = threadIdx.x * 4; i < n; i += stride) acc = __fadd_rn(acc, sumsq4(load4_planes(part + i, planes, plane)));
    return acc;
  }
  for (int i0 = threadIdx.x * 4; i0 < n; i0 += stride * kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      v[u] = i0 + u * stride < n ? load4(part + i0 + u * stride) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + u * stride < n) acc = __fadd_rn(acc, sumsq4(v[u]));
  }
  return acc;
}
template <int kBatch, class Y>
__device__ __forceinline__ float2 qk_inv_rms(const Y* row, int QD, int KVD, bool with_q, bool with_k, int planes,
                                             long plane, float eps, float* shm) {
  const float sq = with_q ? qk_sum_squares<kBatch>(row, QD, planes, plane) : 0.f;
  const float sk = with_k ? qk_sum_squares<kBatch>(row + QD, KVD, planes, plane) : 0.f;
  float2 r = make_float2(0.f, 0.f);
  if (with_q) r.x = rsqrtf(block_sum(sq, shm) / QD + eps);
  if (with_k) r.y = rsqrtf(block_sum(sk, shm) / KVD + eps);
  return r;
}

// One unit of 4 rotation pairs of a head: elements [j, j + 4) (-> lo) and [D/2 + j, D/2 + j + 4)
// (-> hi) of head values hv normalised by r and weights nw, rotated by the (cos, sin) pairs cs[j ..]
// of the token's position.
template <int D, class Y>
__device__ __forceinline__ void qk_rope_unit(const Y* hv, const float* nw, const float2* cs, int j, float r,
                                             int planes, long plane, float4& lo, float4& hi) {
  const float4 a = load4_planes(hv + j, planes, plane), b = load4_planes(hv + D / 2 + j, planes, plane);
  const float4 wa = *reinterpret_cast<const float4*>(nw + j), wb = *reinterpret_cast<const float4*>(nw + D / 2 + j);
  const float4 c01 = *reinterpret_cast<const float4*>(cs + j), c23 = *reinterpret_cast<const float4*>(cs + j + 2);
  auto nrm = [r](float x, float w) { return __fmul_rn(__fmul_rn(x, r), w); };
  // out_lo = a cos - b sin, out_hi = b cos + a sin
  auto rot_lo = [](float a, float b, float c, float s) { return __fmaf_rn(a, c, -__fmul_rn(b, s)); };
  auto rot_hi = [](float a, float b, float c, float s) { return __fmaf_rn(b, c, __fmul_rn(a, s)); };
  const float a0 = nrm(a.x, wa.x), a1 = nrm(a.y, wa.y), a2 = nrm(a.z, wa.z), a3 = nrm(a.w, wa.w);
  const float b0 = nrm(b.x, wb.x), b1 = nrm(b.y, wb.y), b2 = nrm(b.z, wb.z), b3 = nrm(b.w, wb.w);
  // (cos, sin) pairs: c01 = (c0, s0, c1, s1), c23 = (c2, s2, c3, s3)
  lo = make_float4(rot_lo(a0, b0, c01.x, c01.y), rot_lo(a1, b1, c01.z, c01.w), rot_lo(a2, b2, c23.x, c23.y),
                   rot_lo(a3, b3, c23.z, c23.w));
  hi = make_float4(rot_hi(a0, b0, c01.x, c01.y), rot_hi(a1, b1, c01.z, c01.w), rot_hi(a2, b2, c23.x, c23.y),
                   rot_hi(a3, b3, c23.z, c23.w));
}

// q_norm over all query heads and k_norm over all kv heads (full-width RMS), RoPE at position
// pos[t], then q into q_out [T, QD] and k, v into the layer's KV pools at slot[t] (read on the
// device, so a captured step replays for any positions); with fp8 pools and k_st given, prefill
// tokens (st_slot_of[t] >= 0) also write the stored values, widened to T, to the 16-bit staging
// pools the prefill attentions read (see kv_stage_gather). Block (t, c) owns a chunk of up to
// `per_block` heads: chunks 0 .. ceil(n_heads / per_block) - 1 are query heads, the rest kv heads.
// Each block sums the squares of its full-width part (q or k) once and normalises its heads with
// it: one head per block keeps a decode step's few tokens spread over the GPU, whole parts per
// block keep a prefill from re-reading each row once per head (a 2048-token 7B step would read
// 2 GB from L2 per layer).
//   qkv:  [T, QD + 2 KVD] float32 (in `planes` planes) or 16-bit (the fused projection's output)
//   rope: [positions, D/2] (cos, sin)
inline constexpr int kQkThreads = 128;
template <class T, int D, class Y = float, class KV = T>
__global__ void __launch_bounds__(kQkThreads) qk_norm_rope_kv(
    const Y* __restrict__ qkv, int planes, long plane, int n_heads, int n_kv, int per_block,
    const float* __restrict__ q_norm, const float* __restrict__ k_norm, const float2* __restrict__ rope, float eps,
    const int* __restrict__ pos_of, const int* __restrict__ slot_of, T* __restrict__ q_out, KV* __restrict__ k_pool,
    KV* __restrict__ v_pool, const int* __restrict__ st_slot_of = nullptr, T* __restrict__ k_st = nullptr,
    T* __restrict__ v_st = nullptr) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  const int t = blockIdx.x, q_chunks = (n_heads + per_block - 1) / per_block;
  const bool is_q = static_cast<int>(blockIdx.y) < q_chunks;
  const int first = (is_q ? blockIdx.y : blockIdx.y - q_chunks) * per_block;
  const int last = min(first + per_block, is_q ? n_heads : n_kv);
  const int QD = n_heads * D, KVD = n_kv * D, QKV = QD + 2 * KVD;
  const Y* row = qkv + static_cast<size_t>(t) * QKV;
  const Y* part = is_q ? row : row + QD;
  const float2 rr = qk_inv_rms<8>(row, QD, KVD, is_q, !is_q, planes, plane, eps, shm);
  const float r = is_q ? rr.x : rr.y;
  // Units of 4 rotation pairs (qk_rope_unit), so a thread holds both halves RoPE mixes; every
  // thread of the block has independent units in flight.
  constexpr int kUnits = D / 8;  // per head
  const float2* cs = rope + static_cast<size_t>(pos_of[t]) * (D / 2);
  const size_t kv_row = static_cast<size_t>(slot_of[t]) * KVD;
  // fp8 pools: a prefill token's k / v also go, widened, to its staging slot (st_slot_of[t] >= 0).
  const int st_slot = kIsFp8Kv<KV> && k_st && !is_q ? st_slot_of[t] : -1;
  const size_t st_row = static_cast<size_t>(max(st_slot, 0)) * KVD;
  for (int u = threadIdx.x; u < (last - first) * kUnits; u += kQkThreads) {
    const int head = first + u / kUnits, j = 4 * (u % kUnits);
    float4 lo, hi;
    qk_rope_unit<D>(part + head * D, (is_q ? q_norm : k_norm) + head * D, cs, j, r, planes, plane, lo, hi);
    if (is_q) {
      T* dst = q_out + static_cast<size_t>(t) * QD + head * D;
      store4<T>(dst + j, lo.x, lo.y, lo.z, lo.w);
      store4<T>(dst + D / 2 + j, hi.x, hi.y, hi.z, hi.w);
    } else {
      KV* dst = k_pool + kv_row + head * D;
      T* kst = st_slot >= 0 ? k_st + st_row + head * D : nullptr;
      store4_kv<T, KV>(dst + j, kst ? kst + j : nullptr, lo.x, lo.y, lo.z, lo.w);
      store4_kv<T, KV>(dst + D / 2 + j, kst ? kst + D / 2 + j : nullptr, hi.x, hi.y, hi.z, hi.w);
      const Y* vs = row + QD + KVD + head * D;
      const float4 va = load4_planes(vs + j, planes, plane), vb = load4_planes(vs + D / 2 + j, planes, plane);
      KV* vd = v_pool + kv_row + head * D;
      T* vst = st_slot >= 0 ? v_st + st_row + head * D : nullptr;
      store4_kv<T, KV>(vd + j, vst ? vst + j : nullptr, va.x, va.y, va.z, va.w);
      store4_kv<T, KV>(vd + D / 2 + j, vst ? vst + D / 2 + j : nullptr, vb.x, vb.y, vb.z, vb.w);
    }
  }
}

// Heads per qk_norm_rope_kv block for T token rows: one while the grid is small (decode), more as
// T grows, so that about four blocks per SM remain; all of a part's heads from ~30 rows up (7B).
inline int qk_heads_per_block(int T, int n_heads, int n_kv, int sms) {
  const long blocks_one = static_cast<long>(T) * (n_heads + n_kv);
  const long per = blocks_one / (4L * sms);
  return static_cast<int>(std::clamp<long>(per, 1, std::max(n_heads, n_kv)));
}

}  // namespace afs::cuda
