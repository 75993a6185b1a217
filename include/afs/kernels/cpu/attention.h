// Causal attention with grouped KV heads over a token-major KV cache, float32.
//
//   q:   [T, n_heads, D]   queries of tokens at positions pos0 .. pos0+T-1 (already normed + roped)
//   k,v: [ctx, n_kv, D]    cache rows 0 .. pos0+T-1 valid (row stride ld_kv floats)
//   out: [T, n_heads, D]
// Query head h reads KV head h / (n_heads / n_kv). Each (token, head) pair is one unit of work:
// scores, a max-subtracted softmax and the weighted sum of V, in float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace afs::cpu {

inline void attention_causal(const float* q, int T, int n_heads, int n_kv, int D, const float* k, const float* v,
                             size_t ld_kv, int pos0, float scale, float* out) {
  const int group = n_heads / n_kv;
  const int ctx = pos0 + T;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(ctx));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < n_heads; ++h) {
        const float* qh = q + (static_cast<size_t>(t) * n_heads + h) * D;
        const int kvh = h / group;
        const int n = pos0 + t + 1;  // causal: keys 0 .. pos0 + t
        float mx = -INFINITY;
        for (int j = 0; j < n; ++j) {
          const float* kj = k + static_cast<size_t>(j) * ld_kv + static_cast<size_t>(kvh) * D;
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
          const float* vj = v + static_cast<size_t>(j) * ld_kv + static_cast<size_t>(kvh) * D;
          const float w = p[j] * inv;
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] += w * vj[d];
        }
      }
    }
  }
}

}  // namespace afs::cpu
