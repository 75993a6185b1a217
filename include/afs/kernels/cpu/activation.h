// SwiGLU over the fused gate_up projection: out[t, i] = silu(gate[t, i]) * up[t, i],
// where gate_up[t] = [gate (I) | up (I)].
#pragma once

#include <cmath>
#include <cstddef>

#include "afs/kernels/cpu/simd.h"

namespace afs::cpu {

inline void swiglu(const float* gate_up, int T, int I, float* out) {
#pragma omp parallel for schedule(static) if (T > 1)
  for (int t = 0; t < T; ++t) {
    const float* g = gate_up + static_cast<size_t>(t) * 2 * I;
    const float* u = g + I;
    float* o = out + static_cast<size_t>(t) * I;
    int i = 0;
    for (; i + kLanes <= I; i += kLanes) {
      const vf16 gv = load16(g + i);
      store16(o + i, gv / (1.0f + exp16(-gv)) * load16(u + i));
    }
    for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace afs::cpu
