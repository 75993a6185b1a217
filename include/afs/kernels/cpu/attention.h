// Causal attention with grouped KV heads over a paged KV cache, float32.
//
//   q:      [T, n_heads, D]  queries of one sequence at positions pos0 .. pos0+T-1 (normed + roped)
//   kpool,  [slots, n_kv, D] the block pool; position p of the sequence is slot
//   vpool:                   blocks[p / block_size] * block_size + p % block_size
//   out:    [T, n_heads, D]
// Query head h reads KV head h / (n_heads / n_kv). Two loop nests (same result, different speed):
//
//  * few tokens (decode): each (token, head) pair is one unit of work: scores, a max-subtracted
//    softmax and the weighted sum of V.
//  * many tokens (prefill): flash-attention style tiles of 32 query tokens of one head, the tokens
//    in the vector lanes, over blocks of kAttnKeys keys: scores S^T[key][tok] += k[key][d] q^T[d][tok]
//    (broadcast k, as linear.h broadcasts W), an online softmax per token lane (running max and
//    sum, no horizontal reductions), then O^T[d][tok] += v[key][d] P^T[key][tok]. K and V are read
//    once per tile instead of once per (token, head).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "afs/kernels/cpu/simd.h"

namespace afs::cpu {

// Tuning (speed only).
constexpr int kAttnMinTokens = 8;         // T at or above which the tiled nest runs
constexpr int kAttnTokens = 2 * kLanes;   // query tokens per tile (vector lanes)
constexpr int kAttnKeys = 12;             // keys per block (broadcast operands)
constexpr int kAttnMaxHeadDim = 256;      // config.py rejects larger head_dim

// st[i][0..32) = sum_d kb[i][d] * qt[d][0..32), i < kAttnKeys (kb: [kAttnKeys][D], qt: [D][32]).
inline void attn_scores(const float* kb, int D, const float* qt, float* st) {
  vf16 acc[kAttnKeys][2];  // NOTE: a local array, so the compiler keeps it in registers
  for (int i = 0; i < kAttnKeys; ++i) acc[i][0] = acc[i][1] = vf16{};
  for (int d = 0; d < D; ++d) {
    const vf16 q0 = load16(qt + d * kAttnTokens), q1 = load16(qt + d * kAttnTokens + kLanes);
    for (int i = 0; i < kAttnKeys; ++i) {
      const float k = kb[i * D + d];
      acc[i][0] += q0 * k;
      acc[i][1] += q1 * k;
    }
  }
  for (int i = 0; i < kAttnKeys; ++i) {
    store16(st + i * kAttnTokens, acc[i][0]);
    store16(st + i * kAttnTokens + kLanes, acc[i][1]);
  }
}

// ot[d][..] = ot[d][..] * alpha + sum_{i < nk} vb[i][d] * pt[i][..] for d in [d0, d0 + ND).
template <int ND>
inline void attn_values(const float* vb, int D, int d0, int nk, const float* pt, vf16 a0, vf16 a1, float* ot) {
  vf16 acc[ND][2];
  for (int e = 0; e < ND; ++e) {
    acc[e][0] = load16(ot + (d0 + e) * kAttnTokens) * a0;
    acc[e][1] = load16(ot + (d0 + e) * kAttnTokens + kLanes) * a1;
  }
  for (int i = 0; i < nk; ++i) {
    const vf16 p0 = load16(pt + i * kAttnTokens), p1 = load16(pt + i * kAttnTokens + kLanes);
    for (int e = 0; e < ND; ++e) {
      const float v = vb[i * D + d0 + e];
      acc[e][0] += p0 * v;
      acc[e][1] += p1 * v;
    }
  }
  for (int e = 0; e < ND; ++e) {
    store16(ot + (d0 + e) * kAttnTokens, acc[e][0]);
    store16(ot + (d0 + e) * kAttnTokens + kLanes, acc[e][1]);
  }
}

inline void attention_paged_tiled(const float* q, int T, int n_heads, int n_kv, int D, const float* kpool,
                                  const float* vpool, int block_size, const int32_t* blocks, int pos0, float scale,
                                  float* out) {
  const int group = n_heads / n_kv;
  const size_t row = static_cast<size_t>(n_kv) * D;
  const int tiles = (T + kAttnTokens - 1) / kAttnTokens;
  auto slot = [&](int j) {
    return static_cast<size_t>(blocks[j / block_size]) * block_size + static_cast<size_t>(j % block_size);
  };
#pragma omp parallel
  {
    alignas(64) float qt[kAttnMaxHeadDim * kAttnTokens];  // q^T * scale   [D][32]
    alignas(64) float ot[kAttnMaxHeadDim * kAttnTokens];  // O^T unnormed  [D][32]
    alignas(64) float kb[kAttnKeys * kAttnMaxHeadDim];    // key block     [12][D]
    alignas(64) float vb[kAttnKeys * kAttnMaxHeadDim];    // value block   [12][D]
    alignas(64) float st[kAttnKeys * kAttnTokens];        // scores, then probabilities [12][32]
    // Later tiles see more keys: hand them out first, one at a time.
#pragma omp for schedule(dynamic, 1)
    for (int u = 0; u < tiles * n_heads; ++u) {
      const int tile = tiles - 1 - u / n_heads, h = u % n_heads;
      const int t0 = tile * kAttnTokens, nt = std::min(kAttnTokens, T - t0);
      const size_t kv_off = static_cast<size_t>(h / group) * D;
      for (int d = 0; d < D; ++d)
        for (int r = 0; r < kAttnTokens; ++r)
          qt[d * kAttnTokens + r] = r < nt ? q[(static_cast<size_t>(t0 + r) * n_heads + h) * D + d] * scale : 0.f;
      std::fill(ot, ot + D * kAttnTokens, 0.f);
      vf16 m[2] = {vf16{} - INFINITY, vf16{} - INFINITY}, l[2] = {vf16{}, vf16{}};
      vi16 limit[2];  // last key each token lane may see (padding lanes: the tile's last token's)
      for (int v = 0; v < 2; ++v)
        for (int r = 0; r < kLanes; ++r) limit[v][r] = pos0 + t0 + std::min(v * kLanes + r, nt - 1);
      const int keys = pos0 + t0 + nt;  // keys 0 .. pos0 + t0 + nt - 1
      for (int j0 = 0; j0 < keys; j0 += kAttnKeys) {
        const int nk = std::min(kAttnKeys, keys - j0);
        for (int i = 0; i < kAttnKeys; ++i) {
          float* kd = kb + i * D;
          if (i < nk) {
            const size_t s = slot(j0 + i) * row + kv_off;
            std::memcpy(kd, kpool + s, D * sizeof(float));
            std::memcpy(vb + i * D, vpool + s, D * sizeof(float));
          } else {
            std::fill(kd, kd + D, 0.f);
          }
        }
        attn_scores(kb, D, qt, st);
        const bool diagonal = j0 + nk - 1 > pos0 + t0;  // some key is in the future of some token
        vf16 alpha[2];
        for (int v = 0; v < 2; ++v) {
          vf16 s[kAttnKeys];
          vf16 mx = m[v];
          for (int i = 0; i < nk; ++i) {
            s[i] = load16(st + i * kAttnTokens + v * kLanes);
            if (diagonal) s[i] = (vi16{} + (j0 + i)) > limit[v] ? vf16{} - INFINITY : s[i];
            mx = s[i] > mx ? s[i] : mx;
          }
          alpha[v] = exp16(m[v] - mx);
          vf16 sum = vf16{};
          for (int i = 0; i < nk; ++i) {
            const vf16 p = exp16(s[i] - mx);
            sum += p;
            store16(st + i * kAttnTokens + v * kLanes, p);
          }
          l[v] = l[v] * alpha[v] + sum;
          m[v] = mx;
        }
        int d0 = 0;
        for (; d0 + 12 <= D; d0 += 12) attn_values<12>(vb, D, d0, nk, st, alpha[0], alpha[1], ot);
        switch (D - d0) {  // head_dim is even
          case 2: attn_values<2>(vb, D, d0, nk, st, alpha[0], alpha[1], ot); break;
          case 4: attn_values<4>(vb, D, d0, nk, st, alpha[0], alpha[1], ot); break;
          case 6: attn_values<6>(vb, D, d0, nk, st, alpha[0], alpha[1], ot); break;
          case 8: attn_values<8>(vb, D, d0, nk, st, alpha[0], alpha[1], ot); break;
          case 10: attn_values<10>(vb, D, d0, nk, st, alpha[0], alpha[1], ot); break;
          default: break;
        }
      }
      for (int r = 0; r < nt; ++r) {
        const float inv = 1.0f / l[r / kLanes][r % kLanes];
        float* o = out + (static_cast<size_t>(t0 + r) * n_heads + h) * D;
        for (int d = 0; d < D; ++d) o[d] = ot[d * kAttnTokens + r] * inv;
      }
    }
  }
}

inline void attention_paged(const float* q, int T, int n_heads, int n_kv, int D, const float* kpool, const float* vpool,
                            int block_size, const int32_t* blocks, int pos0, float scale, float* out) {
  if (T >= kAttnMinTokens && D <= kAttnMaxHeadDim) {
    attention_paged_tiled(q, T, n_heads, n_kv, D, kpool, vpool, block_size, blocks, pos0, scale, out);
    return;
  }
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
