// CPU linear layers: y[T, N] = x[T, K] . W[N, K]^T with W in its storage type, float32 accumulation.
//
// Weights stream once per call: each thread owns a contiguous range of output rows and reads each
// weight row once for a block of kTokenBlock tokens, so prefill reuses every weight load
// kTokenBlock times and decode (T = 1) is a pure weight stream. `omp simd reduction` lets the
// compiler vectorise the dot products without -ffast-math.
#pragma once

#include <algorithm>
#include <cstddef>

#include "afs/types.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace afs::cpu {

template <int kTokenBlock, class W>
inline void linear_rows(const float* x, int T, int K, const W* w, int n0, int n1, float* y, int ldy) {
  for (int n = n0; n < n1; ++n) {
    const W* wr = w + static_cast<size_t>(n) * K;
    int t = 0;
    for (; t + kTokenBlock <= T; t += kTokenBlock) {
      float acc[kTokenBlock];
      for (int b = 0; b < kTokenBlock; ++b) acc[b] = 0.f;
      const float* xb = x + static_cast<size_t>(t) * K;
      if constexpr (kTokenBlock == 4) {
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int k = 0; k < K; ++k) {
          const float wv = to_float(wr[k]);
          s0 += xb[k] * wv;
          s1 += xb[K + k] * wv;
          s2 += xb[2 * K + k] * wv;
          s3 += xb[3 * K + k] * wv;
        }
        acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3;
      } else {
        for (int b = 0; b < kTokenBlock; ++b) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int k = 0; k < K; ++k) s += xb[static_cast<size_t>(b) * K + k] * to_float(wr[k]);
          acc[b] = s;
        }
      }
      for (int b = 0; b < kTokenBlock; ++b) y[static_cast<size_t>(t + b) * ldy + n] = acc[b];
    }
    for (; t < T; ++t) {
      const float* xt = x + static_cast<size_t>(t) * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < K; ++k) s += xt[k] * to_float(wr[k]);
      y[static_cast<size_t>(t) * ldy + n] = s;
    }
  }
}

// y[T, N] (row stride ldy) = x[T, K] . W[N, K]^T
template <class W>
void linear(const float* x, int T, int K, const W* w, int N, float* y, int ldy) {
#pragma omp parallel
  {
#ifdef _OPENMP
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int nt = 1, id = 0;
#endif
    // Contiguous row ranges, multiples of 8 rows, so each thread streams its own part of W.
    const int per = (N + nt - 1) / nt;
    const int chunk = (per + 7) / 8 * 8;
    const int n0 = std::min(N, id * chunk), n1 = std::min(N, n0 + chunk);
    linear_rows<4>(x, T, K, w, n0, n1, y, ldy);
  }
}

}  // namespace afs::cpu
