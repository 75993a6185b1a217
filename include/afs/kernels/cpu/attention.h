// Causal attention with grouped KV heads over a paged KV cache, float32.
//
//   q:      [T, n_heads, D]  queries of one sequence at positions pos0 .. pos0+T-1 (normed + roped)
//   kpool,  [slots, n_kv, D] the block pool; position p of the sequence is slot
//   vpool:                   blocks[p / block_size] * block_size + p % block_size
//   out:    [T, n_heads, D]
// Query head h reads KV head h / (n_heads / n_kv). Each (token, head) pair is one unit of work:
// scores, a max-subtracted softmax and the weighted sum of V, in float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace afs::cpu {

inline void attention_paged(const float* q, int T, int n_heads, int n_kv, int D, const float* kpool, const float* vpool,
                            int block_size, const int32_t* blocks, int pos0, float scale, float* out) {
  const int group = n_heads / n_kv;
  const int ctx = pos0 + T;
  const size_t row = static_cast<size_t>(n_kv) * D;
  auto slot = [&](int j) {
    return static_cast<size_t>(blocks[j / block_size]) * block_size + static_cast<size_t>(j % block_size);
  };
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(ctx));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < n_heads; ++h) {
        const float* qh = q + (static_cast<size_t>(t) * n_heads + h) * D;
        const size_t head = static_cast<size_t>(h / group) * D;
        const int n = pos0 + t + 1;  // causal: keys 0 .. pos0 + t
        float mx = -INFINITY;
        for (int j = 0; j < n; ++j) {
          const float* kj = kpool + slot(j) * row + head;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qh[d] * kj[d];
          s *= scale;
          p[j] = s;
          mx = std::max(mx, s);
        }
        float sum = 0.f;
        for (int j = 0; j < n; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        const float inv = 1.0f / sum;
        float* o = out + (static_cast<size_t>(t) * n_heads + h) * D;
        std::fill(o, o + D, 0.f);
        for (int j = 0; j < n; ++j) {
          const float* vj = vpool + slot(j) * row + head;
          const float w = p[j] * inv;
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] += w * vj[d];
        }
      }
    }
  }
}

}  // namespace afs::cpu
