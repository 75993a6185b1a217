// Row-wise kernels of the OLMo 2 forward on the GPU. One block per token row; float32 math.
//   embed_gather          x[t] = embed[tok[t]] (float32 residual) and xa[t] = x[t] (GEMM input type)
//   rms_norm_residual     x[t] += rmsnorm(h[t]) * w ; xa[t] = x[t]
//   rms_norm_cast         out[i] = rmsnorm(x[rows[i]]) * w   (final norm before lm_head)
//   swiglu                act[t, i] = silu(gu[t, i]) * gu[t, I + i]
#pragma once

#include "afs/kernels/cuda/common.cuh"

namespace afs::cuda {

template <class T>
__global__ void embed_gather(const int32_t* __restrict__ tokens, const T* __restrict__ embed, int H,
                             float* __restrict__ x, T* __restrict__ xa) {
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
  __shared__ float shm[32];
  const size_t src = static_cast<size_t>(rows[blockIdx.x]) * H, dst = static_cast<size_t>(blockIdx.x) * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) ss += x[src + i] * x[src + i];
  const float r = rsqrtf(block_sum(ss, shm) / H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) out[dst + i] = from_f32<T>(x[src + i] * r * w[i]);
}

template <class T>
__global__ void swiglu(const float* __restrict__ gu, int I, T* __restrict__ act) {
  const size_t t = blockIdx.x;
  const float* g = gu + t * 2 * I;
  for (int i = threadIdx.x; i < I; i += blockDim.x) {
    const float a = g[i];
    act[t * I + i] = from_f32<T>(a / (1.f + __expf(-a)) * g[I + i]);
  }
}

// q_norm over all query heads and k_norm over all kv heads (full-width RMS), RoPE at position
// pos[t], then q into q_out [T, QD] and k, v into the layer's KV pools at slot[t] (read on the
// device, so a captured step replays for any positions).
//   qkv: [T, QD + 2 KVD] float32 (the fused projection's output)
template <class T, int D>
__global__ void qk_norm_rope_kv(const float* __restrict__ qkv, int QD, int KVD, const float* __restrict__ q_norm,
                                const float* __restrict__ k_norm, const float* __restrict__ inv_freq, float eps,
                                const int* __restrict__ pos_of, const int* __restrict__ slot_of,
                                T* __restrict__ q_out, T* __restrict__ k_pool, T* __restrict__ v_pool) {
  __shared__ float shm[32];
  const int t = blockIdx.x;
  const int QKV = QD + 2 * KVD;
  const float* row = qkv + static_cast<size_t>(t) * QKV;
  float sq = 0.f, sk = 0.f;
  for (int i = threadIdx.x; i < QD; i += blockDim.x) sq += row[i] * row[i];
  for (int i = threadIdx.x; i < KVD; i += blockDim.x) sk += row[QD + i] * row[QD + i];
  const float rq = rsqrtf(block_sum(sq, shm) / QD + eps);
  const float rk = rsqrtf(block_sum(sk, shm) / KVD + eps);
  const int pos = pos_of[t];
  const size_t kv_row = static_cast<size_t>(slot_of[t]) * KVD;
  constexpr int H2 = D / 2;
  // Each thread rotates pairs (i, i + D/2) of one head.
  for (int p = threadIdx.x; p < (QD + KVD) / 2; p += blockDim.x) {
    const bool is_q = p < QD / 2;
    const int pp = is_q ? p : p - QD / 2;
    const int head = pp / H2, i = pp % H2;
    const int a_idx = head * D + i, b_idx = a_idx + H2;
    const float freq = static_cast<float>(pos) * inv_freq[i];
    float s, c;
    sincosf(freq, &s, &c);
    if (is_q) {
      const float a = row[a_idx] * rq * q_norm[a_idx], b = row[b_idx] * rq * q_norm[b_idx];
      q_out[static_cast<size_t>(t) * QD + a_idx] = from_f32<T>(a * c - b * s);
      q_out[static_cast<size_t>(t) * QD + b_idx] = from_f32<T>(b * c + a * s);
    } else {
      const float a = row[QD + a_idx] * rk * k_norm[a_idx], b = row[QD + b_idx] * rk * k_norm[b_idx];
      k_pool[kv_row + a_idx] = from_f32<T>(a * c - b * s);
      k_pool[kv_row + b_idx] = from_f32<T>(b * c + a * s);
    }
  }
  for (int i = threadIdx.x; i < KVD; i += blockDim.x) v_pool[kv_row + i] = from_f32<T>(row[QD + KVD + i]);
}

}  // namespace afs::cuda
