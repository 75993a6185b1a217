// CPU linear layers: y[T, N] = x[T, K] . W[N, K]^T with W in its storage type, float32 accumulation.
//
// Two loop nests, picked by the number of tokens T (they differ in speed, not in what they compute):
//
//  * few tokens (decode): `linear_dot`, dot products along K. Each thread streams its own
//    contiguous range of W rows once, kDotRows rows at a time (independent accumulator chains
//    keep several loads in flight), for up to kDotTokens tokens per pass. Memory-bound: the goal
//    is the machine's read bandwidth on W.
//  * many tokens (prefill): `linear_gemm`, a register-tiled GEMM with the tokens in the vector
//    lanes. x is packed transposed, xt[K][32 tokens] (cheap: T*K), and each block of kGemmRows
//    W rows is converted once to a float32 row buffer, so the micro-kernel is
//    acc[12 rows][2 x 16 tokens] += broadcast(w[row, k]) * xt[k][tokens]: 24 FMAs for 2 vector
//    loads and 12 broadcasts, with no transposition of W and no horizontal sums. Tokens go in
//    chunks small enough that the packed x of a chunk stays in L2 while every row block reads it.
//
// Both are written in the 16-lane vf16 of simd.h.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "afs/kernels/cpu/simd.h"
#include "afs/types.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace afs::cpu {

// Tuning (speed only): tile shapes of the two loop nests and where one hands over to the other.
constexpr int kDotRows = 4;              // W rows per dot-product pass
constexpr int kDotTokens = 4;            // tokens per dot-product pass (W is re-read per pass)
constexpr int kGemmMinTokens = 8;        // T at or above which the GEMM nest runs
constexpr int kGemmRows = 12;            // W rows per micro-tile (broadcast operands)
constexpr int kGemmTokens = 2 * kLanes;  // tokens per micro-tile (vector operands)
constexpr int kGemmDepth = 256;         // K block: the 12 x 256 float32 slice of W stays in L1
constexpr int kGemmBufStride = kGemmDepth + 16;  // NOTE: not a multiple of 4 KB / 12: the rows fall in different L1 sets
constexpr int kGemmMaxGroups = 8;       // at most 8 x 32 tokens per chunk
constexpr size_t kGemmPackedBytes = size_t{1} << 20;  // L2 budget for a chunk's packed x
static_assert(kGemmTokens % kLanes == 0 && kGemmRows * (kGemmTokens / kLanes) <= 24,
              "micro-tile accumulators must fit the 32 AVX-512 registers with room for operands");

// ---- few tokens: dot products along K --------------------------------------------------------

// bfloat16 weights, 32 at a time: the even-indexed ones are the low halves of the 32-bit words,
// the odd-indexed ones the high halves, so two bit operations widen them (no shuffles). The
// matching x is stored split the same way: per 32-block, [x0 x2 .. x30 | x1 x3 .. x31].
inline void load32_split(const bf16* p, vf16& even, vf16& odd) {
  vu32x16 u;
  std::memcpy(&u, p, sizeof u);
  const vu32x16 lo = u << 16, hi = u & 0xFFFF0000u;
  std::memcpy(&even, &lo, sizeof even);
  std::memcpy(&odd, &hi, sizeof odd);
}

// x [T][K] -> out [T][K] with each full 32-block split into its even and odd elements.
inline void split_even_odd(const float* x, int T, int K, float* out) {
  for (int t = 0; t < T; ++t) {
    const float* s = x + static_cast<size_t>(t) * K;
    float* d = out + static_cast<size_t>(t) * K;
    int k = 0;
    for (; k + 2 * kLanes <= K; k += 2 * kLanes)
      for (int i = 0; i < kLanes; ++i) d[k + i] = s[k + 2 * i], d[k + kLanes + i] = s[k + 2 * i + 1];
    for (; k < K; ++k) d[k] = s[k];
  }
}

// y[t, n .. n+R) for tokens t < NT: R rows of W against NT rows of x (split for bf16 W).
template <int R, int NT, class W>
inline void dot_tile(const float* x, int K, const W* w, int n, float* y, int ldy) {
  vf16 acc[NT][R];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = vf16{};
  const W* wr = w + static_cast<size_t>(n) * K;
  int k = 0;
  if constexpr (std::is_same_v<W, bf16>) {
    for (; k + 2 * kLanes <= K; k += 2 * kLanes) {
      vf16 we[R], wo[R];
      for (int r = 0; r < R; ++r) load32_split(wr + static_cast<size_t>(r) * K + k, we[r], wo[r]);
      for (int r = 0; r < R; ++r) __builtin_prefetch(wr + static_cast<size_t>(r + R) * K + k);  // next tile's rows
      for (int t = 0; t < NT; ++t) {
        const vf16 xe = load16(x + static_cast<size_t>(t) * K + k);
        const vf16 xo = load16(x + static_cast<size_t>(t) * K + k + kLanes);
        for (int r = 0; r < R; ++r) acc[t][r] += xe * we[r] + xo * wo[r];
      }
    }
  } else {
    for (; k + kLanes <= K; k += kLanes) {
      vf16 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16(wr + static_cast<size_t>(r) * K + k);
      for (int r = 0; r < R; ++r) __builtin_prefetch(wr + static_cast<size_t>(r + R) * K + k);  // next tile's rows
      for (int t = 0; t < NT; ++t) {
        const vf16 xv = load16(x + static_cast<size_t>(t) * K + k);
        for (int r = 0; r < R; ++r) acc[t][r] += xv * wv[r];
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[t][r]);
      for (int kk = k; kk < K; ++kk) s += x[static_cast<size_t>(t) * K + kk] * to_float(wr[static_cast<size_t>(r) * K + kk]);
      y[static_cast<size_t>(t) * ldy + n + r] = s;
    }
}

template <int NT, class W>
inline void dot_rows(const float* x, int K, const W* w, int n0, int n1, float* y, int ldy) {
  int n = n0;
  for (; n + kDotRows <= n1; n += kDotRows) dot_tile<kDotRows, NT>(x, K, w, n, y, ldy);
  for (; n < n1; ++n) dot_tile<1, NT>(x, K, w, n, y, ldy);
}

template <class W>
void linear_dot(const float* x, int T, int K, const W* w, int N, float* y, int ldy) {
  if constexpr (std::is_same_v<W, bf16>) {
    thread_local std::vector<float> xs;
    xs.resize(static_cast<size_t>(T) * K);
    split_even_odd(x, T, K, xs.data());
    x = xs.data();
  }
#pragma omp parallel
  {
#ifdef _OPENMP
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int nt = 1, id = 0;
#endif
    // Contiguous row ranges, multiples of 16 rows, so each thread streams its own part of W.
    const int per = (N + nt - 1) / nt;
    const int chunk = (per + 15) / 16 * 16;
    const int n0 = std::min(N, id * chunk), n1 = std::min(N, n0 + chunk);
    for (int t = 0; t < T; t += kDotTokens) {
      const float* xt = x + static_cast<size_t>(t) * K;
      float* yt = y + static_cast<size_t>(t) * ldy;
      switch (std::min(kDotTokens, T - t)) {
        case 1: dot_rows<1>(xt, K, w, n0, n1, yt, ldy); break;
        case 2: dot_rows<2>(xt, K, w, n0, n1, yt, ldy); break;
        case 3: dot_rows<3>(xt, K, w, n0, n1, yt, ldy); break;
        default: dot_rows<4>(xt, K, w, n0, n1, yt, ldy); break;
      }
    }
  }
}

// ---- many tokens: register-tiled GEMM, tokens in the vector lanes ----------------------------

// tile[i][j*16 .. j*16+16) (+)= sum_{k < kc} wb[i][k] * xt[k][j*16 .. j*16+16) for kGemmRows rows
// of W as float32 (row stride ldw) and NV x 16 tokens of the packed x (row stride kGemmTokens).
template <int NV>
inline void gemm_tile(const float* wb, size_t ldw, const float* xt, int kc, float* tile, bool accumulate) {
  vf16 acc[kGemmRows][NV];  // NOTE: a local array, so the compiler keeps it in registers
  for (int i = 0; i < kGemmRows; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? load16(tile + (i * NV + j) * kLanes) : vf16{};
  for (int k = 0; k < kc; ++k) {
    vf16 xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = load16(xt + static_cast<size_t>(k) * kGemmTokens + j * kLanes);
    for (int i = 0; i < kGemmRows; ++i) {
      const float wik = wb[i * ldw + k];
      for (int j = 0; j < NV; ++j) acc[i][j] += xv[j] * wik;
    }
  }
  for (int i = 0; i < kGemmRows; ++i)
    for (int j = 0; j < NV; ++j) store16(tile + (i * NV + j) * kLanes, acc[i][j]);
}

// W[n .. n + kGemmRows, k0 .. k0 + kc) as float32: a pointer into W itself when it already is
// float32 and complete, else converted into buf (rows past N zero). Sets ldw to its row stride.
template <class W>
inline const float* gemm_rows_f32(const W* w, int K, int N, int n, int k0, int kc, float* buf, size_t& ldw) {
  const int rows = std::min(kGemmRows, N - n);
  ldw = kGemmBufStride;
  for (int i = 0; i < kGemmRows; ++i) {
    float* dst = buf + static_cast<size_t>(i) * kGemmBufStride;
    if (i >= rows) {
      std::fill(dst, dst + kc, 0.f);
      continue;
    }
    const W* src = w + static_cast<size_t>(n + i) * K + k0;
    int k = 0;
    for (; k + kLanes <= kc; k += kLanes) store16(dst + k, load16(src + k));
    for (; k < kc; ++k) dst[k] = to_float(src[k]);
  }
  return buf;
}

// Prefetch the W slice after (n, k0) so that it streams in while this one is computed.
template <class W>
inline void gemm_prefetch_next(const W* w, int K, int N, int n, int k0) {
  if (k0 + kGemmDepth < K)
    k0 += kGemmDepth;
  else
    n += kGemmRows, k0 = 0;
  const int rows = std::min(kGemmRows, N - n), kc = std::min(kGemmDepth, K - k0);
  constexpr int kLine = 64 / sizeof(W);
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < kc; k += kLine) __builtin_prefetch(w + static_cast<size_t>(n + i) * K + k0 + k, 0, 1);
}

template <class W>
void linear_gemm(const float* x, int T, int K, const W* w, int N, float* y, int ldy) {
  // Tokens per chunk: a multiple of kGemmTokens whose packed x fits the L2 budget.
  const size_t fit = kGemmPackedBytes / (static_cast<size_t>(K) * sizeof(float));
  const int chunk_groups = static_cast<int>(std::max<size_t>(1, std::min<size_t>(kGemmMaxGroups, fit / kGemmTokens)));
  const int chunk_max = chunk_groups * kGemmTokens;
  // xt: [groups][K][kGemmTokens], tokens past the chunk zero.
  thread_local std::vector<float> xt;
  if (xt.size() < static_cast<size_t>(chunk_max) * K) xt = std::vector<float>(static_cast<size_t>(chunk_max) * K);
  const int blocks = (N + kGemmRows - 1) / kGemmRows;
  for (int t0 = 0; t0 < T; t0 += chunk_max) {
    const int tc = std::min(chunk_max, T - t0);
    const int groups = (tc + kGemmTokens - 1) / kGemmTokens;
    float* xp = xt.data();
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int g = 0; g < groups; ++g) {
        float* dst = xp + static_cast<size_t>(g) * K * kGemmTokens;
        const int tg = std::min(kGemmTokens, tc - g * kGemmTokens);
        for (int k0 = 0; k0 < K; k0 += 64) {  // 64 x kGemmTokens blocks keep the transpose in L1
          const int k1 = std::min(K, k0 + 64);
          for (int j = 0; j < tg; ++j) {
            const float* src = x + static_cast<size_t>(t0 + g * kGemmTokens + j) * K;
            for (int k = k0; k < k1; ++k) dst[static_cast<size_t>(k) * kGemmTokens + j] = src[k];
          }
          for (int j = tg; j < kGemmTokens; ++j)
            for (int k = k0; k < k1; ++k) dst[static_cast<size_t>(k) * kGemmTokens + j] = 0.f;
        }
      }
      // implicit barrier: xt is complete
#ifdef _OPENMP
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
      const int nt = 1, id = 0;
#endif
      alignas(64) float wbuf[kGemmRows * kGemmBufStride];
      alignas(64) float tiles[kGemmMaxGroups][kGemmRows * kGemmTokens];
      const int b0 = static_cast<int>(static_cast<long long>(blocks) * id / nt);
      const int b1 = static_cast<int>(static_cast<long long>(blocks) * (id + 1) / nt);
      for (int b = b0; b < b1; ++b) {
        const int n = b * kGemmRows;
        const int rows = std::min(kGemmRows, N - n);
        for (int k0 = 0; k0 < K; k0 += kGemmDepth) {
          const int kc = std::min(kGemmDepth, K - k0);
          size_t ldw = 0;
          const float* wb = gemm_rows_f32(w, K, N, n, k0, kc, wbuf, ldw);
          gemm_prefetch_next(w, K, N, n, k0);
          for (int g = 0; g < groups; ++g) {
            const float* xg = xp + (static_cast<size_t>(g) * K + k0) * kGemmTokens;
            if (tc - g * kGemmTokens > kLanes)
              gemm_tile<2>(wb, ldw, xg, kc, tiles[g], k0 > 0);
            else
              gemm_tile<1>(wb, ldw, xg, kc, tiles[g], k0 > 0);
          }
        }
        for (int g = 0; g < groups; ++g) {
          const int tg = std::min(kGemmTokens, tc - g * kGemmTokens);
          const int width = tg > kLanes ? 2 * kLanes : kLanes;  // tile row length
          float* yg = y + static_cast<size_t>(t0 + g * kGemmTokens) * ldy + n;
          for (int j = 0; j < tg; ++j)  // token-major: each y row gets `rows` contiguous floats
            for (int i = 0; i < rows; ++i) yg[static_cast<size_t>(j) * ldy + i] = tiles[g][i * width + j];
        }
      }
    }
  }
}

// y[T, N] (row stride ldy) = x[T, K] . W[N, K]^T
template <class W>
void linear(const float* x, int T, int K, const W* w, int N, float* y, int ldy) {
  if (T >= kGemmMinTokens)
    linear_gemm(x, T, K, w, N, y, ldy);
  else
    linear_dot(x, T, K, w, N, y, ldy);
}

}  // namespace afs::cpu
