// Rotary position embedding (the "rotate half" form HF uses): for i < D/2,
//   x'[i]       = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
//   x'[i + D/2] = x[i + D/2] cos(p f_i) + x[i] sin(p f_i)
// with f_i = theta^(-2i/D) in float32, exactly as HF computes its inverse frequencies.
#pragma once

#include <cmath>
#include <vector>

namespace afs::cpu {

class RopeTable {
 public:
  RopeTable(int head_dim, double theta, double factor) : half_(head_dim / 2), inv_freq_(half_) {
    for (int i = 0; i < half_; ++i) {
      const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      inv_freq_[i] = 1.0f / std::pow(static_cast<float>(theta), expo) / static_cast<float>(factor);
    }
  }
  // cos/sin for position p into c[half], s[half].
  void at(int p, float* c, float* s) const {
    for (int i = 0; i < half_; ++i) {
      const float a = static_cast<float>(p) * inv_freq_[i];
      c[i] = std::cos(a);
      s[i] = std::sin(a);
    }
  }
  int half() const { return half_; }

 private:
  int half_;
  std::vector<float> inv_freq_;
};

// x: [n_heads, D] for one token.
inline void apply_rope(float* x, int n_heads, int D, const float* c, const float* s) {
  const int h2 = D / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* v = x + h * D;
#pragma omp simd
    for (int i = 0; i < h2; ++i) {
      const float a = v[i], b = v[i + h2];
      v[i] = a * c[i] - b * s[i];
      v[i + h2] = b * c[i] + a * s[i];
    }
  }
}

}  // namespace afs::cpu
