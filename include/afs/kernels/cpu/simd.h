// The 16-lane float32 vector the CPU kernels are written in, and the few operations they share.
//
// vf16 is a GCC/Clang vector extension: one AVX-512 register, two AVX2 registers or four
// SSE/NEON registers, as the target (-march) allows, so one kernel body serves every CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "afs/types.h"

#if defined(__GNUC__) && !defined(__clang__)
// NOTE: without AVX-512, GCC notes that passing 64-byte vectors changes the ABI; these are inline
// functions inside one binary, so there is no ABI to keep.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace afs::cpu {

constexpr int kLanes = 16;
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint16_t vu16x16 __attribute__((vector_size(32)));
typedef uint32_t vu32x16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf16 load16(const bf16* p) {
  vu16x16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32x16 u = __builtin_convertvector(h, vu32x16) << 16;  // bf16 is the top half of a float32
  vf16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline vf16 load16(const f16* p) {
  vf16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }

// Sum of the 16 lanes as a halving tree (four shuffle + add steps).
inline float hsum(vf16 v) {
  vf16 a = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return a[0];
}

// out[j] = sum of the lanes of a[j]: a transposing halving tree (15 two-source shuffles and adds)
// instead of 16 separate horizontal sums. Each step keeps, per input vector, the first half of its
// lane group from one shuffle and the second half from the other.
inline vf16 hsum16(const vf16 (&a)[kLanes]) {
  vf16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float hmax(vf16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x per lane, within 2 ulp of expf over the float range (Cephes expf: x = n ln2 + r,
// |r| <= ln2/2, a degree-5 polynomial for e^r, then 2^n through the exponent bits). Inputs are
// clamped to [-87.3, 88]: below, the result is ~1e-38 instead of a denormal or 0; above, ~1.6e38.
inline vf16 exp16(vf16 x) {
  const vf16 hi = vf16{} + 88.0f, lo = vf16{} - 87.3f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf16 fx = x * 1.44269504088896341f + 0.5f;  // round(x / ln2) as floor(x / ln2 + 0.5)
  vi16 n = __builtin_convertvector(fx, vi16);        // truncates toward zero
  n += (__builtin_convertvector(n, vf16) > fx);      // true lanes are -1: floor for negative fx
  const vf16 nf = __builtin_convertvector(n, vf16);
  const vf16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf16 p = vf16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 bits = (n + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace afs::cpu
