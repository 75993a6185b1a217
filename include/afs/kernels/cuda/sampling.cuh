// Token sampling on the GPU, one block over the vocabulary: greedy (argmax, lowest index on ties),
// or temperature + top-k + top-p + min-p with a counter-based RNG (seed, step), so a request's
// draws depend only on its seed and the token index. Only the sampled id leaves the device.
//
// top-k and top-p thresholds are found by bisection over the value range (counts and masses are
// block reductions), avoiding a sort of the vocabulary.
#pragma once

#include "afs/kernels/cuda/common.cuh"

namespace afs::cuda {

// One logits row's sampling parameters; `step` is the token's index within its request.
struct DeviceSamplingParams {
  float temperature;
  int top_k;
  float top_p;
  float min_p;
  unsigned long long seed;
  unsigned long long step;
  int skip;  // 1: the host samples this row (token_out = -1)
};

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr int kSampleThreads = 1024;
constexpr int kArgmaxParts = 64;  // blocks per row of argmax_partial

// Greedy rows' first pass: block (part, row) finds the max (lowest index on ties) of its slice.
__global__ void __launch_bounds__(256) argmax_partial(const float* __restrict__ logits_all, int V,
                                                      float* __restrict__ part_val, int* __restrict__ part_idx) {
  pdl_trigger();
  pdl_wait();
  __shared__ float s_val[8];
  __shared__ int s_idx[8];
  const float* __restrict__ logits = logits_all + static_cast<size_t>(blockIdx.y) * V;
  const int per = (V + gridDim.x - 1) / gridDim.x;
  const int i0 = blockIdx.x * per, i1 = min(V, i0 + per);
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float v = logits[i];
    if (v > bv) bv = v, bi = i;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_val[warp] = bv, s_idx[warp] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (s_val[w] > bv || (s_val[w] == bv && s_idx[w] < bi)) bv = s_val[w], bi = s_idx[w];
    const size_t o = static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    part_val[o] = bv, part_idx[o] = bi;
  }
}

// One block per row: logits [rows, V] float32 -> token_out[row]. Greedy rows reduce the
// kArgmaxParts partial maxima argmax_partial left for them.
__global__ void __launch_bounds__(kSampleThreads) sample_token(const float* __restrict__ logits_all, int V,
                                                               const DeviceSamplingParams* __restrict__ params,
                                                               const float* __restrict__ part_val,
                                                               const int* __restrict__ part_idx,
                                                               int32_t* __restrict__ token_out) {
  pdl_trigger();
  pdl_wait();
  __shared__ float shm[32];
  __shared__ float s_val[32];
  __shared__ int s_idx[32];
  __shared__ float prefix[kSampleThreads];
  const DeviceSamplingParams p = params[blockIdx.x];
  const float* __restrict__ logits = logits_all + static_cast<size_t>(blockIdx.x) * V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (p.skip) {
    if (tid == 0) token_out[blockIdx.x] = -1;
    return;
  }
  int result = 0;
  if (p.temperature == 0.f || p.top_k == 1) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    if (tid < kArgmaxParts) {
      const size_t o = static_cast<size_t>(blockIdx.x) * kArgmaxParts + tid;
      bv = part_val[o], bi = part_idx[o];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if (lane == 0) s_val[warp] = bv, s_idx[warp] = bi;
    __syncthreads();
    if (warp == 0) {
      const int nw = blockDim.x / 32;
      bv = lane < nw ? s_val[lane] : -INFINITY;
      bi = lane < nw ? s_idx[lane] : 0x7fffffff;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
      }
      if (lane == 0) s_idx[0] = bi;
    }
    __syncthreads();
    result = s_idx[0];
  } else {
    const float inv_t = 1.f / p.temperature;
    float mx = -INFINITY, mn = INFINITY;
    for (int i = tid; i < V; i += blockDim.x) mx = fmaxf(mx, logits[i]), mn = fminf(mn, logits[i]);
    mx = block_max(mx, shm);
    mn = -block_max(-mn, shm);
    // Candidate threshold on the logit: top-k by bisection (largest thr with count >= k).
    float thr = -INFINITY;
    if (p.top_k > 0 && p.top_k < V) {
      float lo = mn, hi = mx;
      for (int it = 0; it < 40; ++it) {
        const float mid = 0.5f * (lo + hi);
        float cnt = 0.f;
        for (int i = tid; i < V; i += blockDim.x) cnt += logits[i] >= mid ? 1.f : 0.f;
        cnt = block_sum(cnt, shm);
        if (cnt >= p.top_k) lo = mid; else hi = mid;
      }
      thr = lo;
    }
    // Unnormalised probabilities e = exp((l - max) / T) of candidates; max e = 1.
    float z = 0.f;
    for (int i = tid; i < V; i += blockDim.x)
      if (logits[i] >= thr) z += __expf((logits[i] - mx) * inv_t);
    z = block_sum(z, shm);
    float emin = 0.f;  // keep e >= emin
    if (p.top_p < 1.f) {
      float lo = 0.f, hi = 1.f;
      for (int it = 0; it < 40; ++it) {
        const float mid = 0.5f * (lo + hi);
        float mass = 0.f;
        for (int i = tid; i < V; i += blockDim.x) {
          if (logits[i] < thr) continue;
          const float e = __expf((logits[i] - mx) * inv_t);
          if (e >= mid) mass += e;
        }
        mass = block_sum(mass, shm);
        if (mass >= p.top_p * z) lo = mid; else hi = mid;
      }
      emin = lo;
    }
    emin = fmaxf(emin, p.min_p);
    // Each thread owns a contiguous range; prefix sums find the sampled index.
    const int per = (V + blockDim.x - 1) / blockDim.x;
    const int i0 = min(V, tid * per), i1 = min(V, i0 + per);
    float own = 0.f;
    for (int i = i0; i < i1; ++i) {
      if (logits[i] < thr) continue;
      const float e = __expf((logits[i] - mx) * inv_t);
      if (e >= emin) own += e;
    }
    prefix[tid] = own;
    __syncthreads();
    if (tid == 0) {
      float run = 0.f;
      for (int j = 0; j < blockDim.x; ++j) {
        const float v = prefix[j];
        prefix[j] = run;
        run += v;
      }
      const unsigned long long r = splitmix64(p.seed ^ splitmix64(p.step + 0x632BE59BD9B4E019ull));
      shm[0] = static_cast<float>((r >> 11) * (1.0 / 9007199254740992.0)) * run;
      shm[1] = run;
      s_idx[0] = -1;
    }
    __syncthreads();
    const float u = shm[0];
    if (own > 0.f && u >= prefix[tid] && u < prefix[tid] + own) {
      float acc = prefix[tid];
      int pick = -1, last = -1;
      for (int i = i0; i < i1; ++i) {
        if (logits[i] < thr) continue;
        const float e = __expf((logits[i] - mx) * inv_t);
        if (e < emin) continue;
        last = i;
        acc += e;
        if (u < acc) {
          pick = i;
          break;
        }
      }
      s_idx[0] = pick >= 0 ? pick : last;
    }
    __syncthreads();
    if (s_idx[0] < 0 && tid == 0) {
      // u landed on the total because of rounding: take the last kept token.
      for (int i = V - 1; i >= 0; --i) {
        if (logits[i] >= thr && __expf((logits[i] - mx) * inv_t) >= emin) {
          s_idx[0] = i;
          break;
        }
      }
    }
    __syncthreads();
    result = s_idx[0];
  }
  if (tid == 0) token_out[blockIdx.x] = result;
}

}  // namespace afs::cuda
