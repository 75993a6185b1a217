// fp8 e4m3 ("e4m3fn": 1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, S.1111.111
// is NaN, the largest finite value is 448) on the host, for the CPU backend's fp8 K/V cache. The
// rounding is the GPU's cvt.rn.satfinite.e4m3x2.f32: to nearest, ties to even, finite values past
// 448 saturate to +-448, NaN stays NaN.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace afs {

inline uint8_t fp8_e4m3_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  if (std::isnan(f)) return static_cast<uint8_t>(sign | 0x7Fu);
  const float a = std::fabs(f);
  if (a >= 448.f) return static_cast<uint8_t>(sign | 0x7Eu);
  if (a < 0.015625f) {  // below 2^-6: subnormals m * 2^-9, m = 0 .. 8 (8 is the smallest normal)
    const float m = std::nearbyint(a * 512.f);  // exact scaling; the default mode rounds ties to even
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(m));
  }
  // Normal: keep 3 of the 23 mantissa bits, rounding the 20 dropped ones to nearest even.
  int e = static_cast<int>((u >> 23) & 0xFFu) - 127;  // -6 .. 8
  uint32_t m = (u & 0x7FFFFFu) >> 20;
  const uint32_t rest = u & 0xFFFFFu;
  if (rest > 0x80000u || (rest == 0x80000u && (m & 1u))) ++m;
  if (m == 8) m = 0, ++e;
  if (e > 8 || (e == 8 && m == 7)) return static_cast<uint8_t>(sign | 0x7Eu);  // rounds past 448: saturate
  return static_cast<uint8_t>(sign | static_cast<uint32_t>(e + 7) << 3 | m);
}

// Every byte's value (exact in float32).
inline const std::array<float, 256>& fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float v = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.f + m / 8.f, e - 7);
      if (e == 15 && m == 7) v = NAN;
      t[b] = (b & 0x80) ? -v : v;
    }
    return t;
  }();
  return table;
}

inline float fp8_e4m3_to_float(uint8_t b) { return fp8_e4m3_table()[b]; }

}  // namespace afs
