// RMSNorm variants of the OLMo 2 forward, float32 throughout.
//   rms_norm:           out = x / rms(x) * w
//   rms_norm_residual:  residual += x / rms(x) * w      (OLMo 2 normalises a block's output, then adds)
#pragma once

#include <cmath>
#include <cstddef>

namespace afs::cpu {

inline float inv_rms(const float* x, int n, float eps) {
  double ss = 0.0;  // double keeps long rows (hidden 5120) exact enough for the 1e-4 logit budget
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
}

// x, out: [T, n] with row strides ldx, ldo (may alias).
inline void rms_norm(const float* x, int ldx, int T, int n, const float* w, float eps, float* out, int ldo) {
#pragma omp parallel for schedule(static) if (T > 1)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * ldx;
    float* o = out + static_cast<size_t>(t) * ldo;
    const float r = inv_rms(xr, n, eps);
#pragma omp simd
    for (int i = 0; i < n; ++i) o[i] = xr[i] * r * w[i];
  }
}

inline void rms_norm_residual(const float* x, int T, int n, const float* w, float eps, float* residual) {
#pragma omp parallel for schedule(static) if (T > 1)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * n;
    float* r = residual + static_cast<size_t>(t) * n;
    const float s = inv_rms(xr, n, eps);
#pragma omp simd
    for (int i = 0; i < n; ++i) r[i] += xr[i] * s * w[i];
  }
}

}  // namespace afs::cpu
