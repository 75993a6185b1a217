// Row-wise kernels of the OLMo 2 forward on the GPU. One block of kRowThreads per token row;
// float32 math. (The MLP's SwiGLU lives in the gate/up GEMM's epilogue, see linear.cuh.)
//   embed_gather          x[t] = embed[tok[t]] (float32 residual) and xa[t] = x[t] (GEMM input type)
//   rms_norm_residual     x[t] += rmsnorm(h[t]) * w ; xa[t] = x[t]
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

template <class T>
__global__ void rms_norm_residual(const float* __restrict__ h, const float* __restrict__ w, int H, float eps,
                                  float* __restrict__ x, T* __restrict__ xa) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  const size_t row = static_cast<size_t>(blockIdx.x) * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) ss += h[row + i] * h[row + i];
  const float r = rsqrtf(block_sum(ss, shm) / H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = x[row + i] + h[row + i] * r * w[i];
    x[row + i] = v;
    xa[row + i] = from_f32<T>(v);
  }
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

// q_norm over all query heads and k_norm over all kv heads (full-width RMS), RoPE at position
// pos[t], then q into q_out [T, QD] and k, v into the layer's KV pools at slot[t] (read on the
// device, so a captured step replays for any positions). Block (t, c) owns a chunk of up to
// `per_block` heads: chunks 0 .. ceil(n_heads / per_block) - 1 are query heads, the rest kv heads.
// Each block sums the squares of its full-width part (q or k) once and normalises its heads with
// it: one head per block keeps a decode step's few tokens spread over the GPU, whole parts per
// block keep a prefill from re-reading each row once per head (a 2048-token 7B step would read
// 2 GB from L2 per layer).
//   qkv:  [T, QD + 2 KVD] float32 (the fused projection's output)
//   rope: [positions, D/2] (cos, sin)
inline constexpr int kQkThreads = 128;
template <class T, int D>
__global__ void __launch_bounds__(kQkThreads) qk_norm_rope_kv(
    const float* __restrict__ qkv, int n_heads, int n_kv, int per_block, const float* __restrict__ q_norm,
    const float* __restrict__ k_norm, const float2* __restrict__ rope, float eps, const int* __restrict__ pos_of,
    const int* __restrict__ slot_of, T* __restrict__ q_out, T* __restrict__ k_pool, T* __restrict__ v_pool) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  const int t = blockIdx.x, q_chunks = (n_heads + per_block - 1) / per_block;
  const bool is_q = static_cast<int>(blockIdx.y) < q_chunks;
  const int first = (is_q ? blockIdx.y : blockIdx.y - q_chunks) * per_block;
  const int last = min(first + per_block, is_q ? n_heads : n_kv);
  const int QD = n_heads * D, KVD = n_kv * D, QKV = QD + 2 * KVD;
  const float* row = qkv + static_cast<size_t>(t) * QKV;
  const float* part = is_q ? row : row + QD;
  const int width = is_q ? QD : KVD;
  float ss = 0.f;
  for (int i = threadIdx.x * 4; i < width; i += kQkThreads * 4) {
    const float4 v = *reinterpret_cast<const float4*>(part + i);
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float r = rsqrtf(block_sum(ss, shm) / width + eps);
  const float2* cs = rope + static_cast<size_t>(pos_of[t]) * (D / 2);
  for (int head = first; head < last; ++head) {
    const float* nw = (is_q ? q_norm : k_norm) + head * D;
    const float* hv = part + head * D;
    T* dst = is_q ? q_out + static_cast<size_t>(t) * QD + head * D
                  : k_pool + static_cast<size_t>(slot_of[t]) * KVD + head * D;
    for (int i = threadIdx.x; i < D / 2; i += kQkThreads) {
      const float a = hv[i] * r * nw[i], b = hv[i + D / 2] * r * nw[i + D / 2];
      const float2 c = cs[i];
      dst[i] = from_f32<T>(a * c.x - b * c.y);
      dst[i + D / 2] = from_f32<T>(b * c.x + a * c.y);
    }
    if (!is_q) {
      T* vd = v_pool + static_cast<size_t>(slot_of[t]) * KVD + head * D;
      for (int i = threadIdx.x; i < D; i += kQkThreads) vd[i] = from_f32<T>(row[QD + KVD + head * D + i]);
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
