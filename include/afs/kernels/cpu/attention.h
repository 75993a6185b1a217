// Causal attention with grouped KV heads over a paged KV cache, float32.
//
//   q:      [T, n_heads, D]  queries of one sequence at positions pos0 .. pos0+T-1 (normed + roped)
//   kpool,  [slots, n_kv, D] the block pool; position p of the sequence is slot
//   vpool:                   blocks[p / block_size] * block_size + p % block_size
//   out:    [T, n_heads, D]
// Query head h reads KV head h / (n_heads / n_kv). Two loop nests (same result, different speed):
//
//  * few tokens (decode): each (token, KV head) pair is one unit of work for the KV head's query
//    heads, so K and V stream from memory once per group: scores 16 keys at a time
//    (hsum16 turns 16 dot-product accumulators into one vector of scores), a max-subtracted
//    softmax with exp16, and the weighted sum of V in registers.
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

// offs[j] = float offset of key j's row in the pool, for keys 0 .. ctx-1 (one division per key
// per call instead of one per key per head).
inline const size_t* key_offsets(int ctx, int block_size, const int32_t* blocks, size_t row) {
  thread_local std::vector<size_t> offs;
  offs.resize(static_cast<size_t>(ctx));
  for (int j = 0; j < ctx; ++j)
    offs[j] = (static_cast<size_t>(blocks[j / block_size]) * block_size + static_cast<size_t>(j % block_size)) * row;
  return offs.data();
}

inline void attention_paged_tiled(const float* q, int T, int n_heads, int n_kv, int D, const float* kpool,
                                  const float* vpool, int block_size, const int32_t* blocks, int pos0, float scale,
                                  float* out) {
  const int group = n_heads / n_kv;
  const size_t row = static_cast<size_t>(n_kv) * D;
  const int tiles = (T + kAttnTokens - 1) / kAttnTokens;
  const size_t* offs = key_offsets(pos0 + T, block_size, blocks, row);
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
            const size_t s = offs[j0 + i] + kv_off;
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
  const int nc = D / kLanes;  // full 16-float chunks of a head; the rest (D % 16) is scalar
  const size_t* offs = key_offsets(pos0 + T, block_size, blocks, row);
  const size_t ldp = static_cast<size_t>(ctx + kLanes);  // p row: one head's scores, padded
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(group) * ldp);
    // One unit = one token and one KV head with its `group` query heads, so that K and V are
    // read from memory once per group; each 16-key block is then reused from L1 by every head.
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int t = 0; t < T; ++t) {
      for (int kvh = 0; kvh < n_kv; ++kvh) {
        const size_t head = static_cast<size_t>(kvh) * D;
        const int n = pos0 + t + 1;  // causal: keys 0 .. pos0 + t
        const float* q0 = q + (static_cast<size_t>(t) * n_heads + static_cast<size_t>(kvh) * group) * D;
        float* o0 = out + (static_cast<size_t>(t) * n_heads + static_cast<size_t>(kvh) * group) * D;
        // Scores, 16 keys at a time: one accumulator per key, then one transposing sum.
        std::vector<vf16> mx(group, vf16{} - INFINITY);
        for (int j0 = 0; j0 < n; j0 += kLanes) {
          for (int g = 0; g < group; ++g) {
            const float* qh = q0 + static_cast<size_t>(g) * D;
            vf16 acc[kLanes];
            for (int i = 0; i < kLanes; ++i) {
              acc[i] = vf16{};
              if (j0 + i >= n) continue;
              const float* kj = kpool + offs[j0 + i] + head;
              for (int c = 0; c < nc; ++c) acc[i] += load16(qh + c * kLanes) * load16(kj + c * kLanes);
              for (int d = nc * kLanes; d < D; ++d) acc[i][0] += qh[d] * kj[d];
            }
            vf16 sc = hsum16(acc) * scale;
            for (int i = n - j0; i < kLanes; ++i) sc[i] = -INFINITY;  // past the last key
            store16(p.data() + g * ldp + j0, sc);
            mx[g] = sc > mx[g] ? sc : mx[g];
          }
        }
        std::vector<float> inv(group);
        for (int g = 0; g < group; ++g) {
          float* pg = p.data() + g * ldp;
          const float m = hmax(mx[g]);
          vf16 sum = vf16{};
          for (int j0 = 0; j0 < n; j0 += kLanes) {
            vf16 w = exp16(load16(pg + j0) - m);
            for (int i = n - j0; i < kLanes; ++i) w[i] = 0.f;  // exp16 never returns exactly 0
            store16(pg + j0, w);
            sum += w;
          }
          inv[g] = 1.0f / hsum(sum);
          std::fill(o0 + static_cast<size_t>(g) * D, o0 + static_cast<size_t>(g + 1) * D, 0.f);
        }
        // out += sum_j p_j v_j per 16-key block; four 16-float chunks of a head at a time.
        for (int j0 = 0; j0 < n; j0 += kLanes) {
          const int nk = std::min(kLanes, n - j0);
          for (int g = 0; g < group; ++g) {
            const float* pg = p.data() + g * ldp + j0;
            float* o = o0 + static_cast<size_t>(g) * D;
            for (int c0 = 0; c0 < nc; c0 += 4) {
              const int cn = std::min(4, nc - c0);
              vf16 acc[4];
              for (int c = 0; c < cn; ++c) acc[c] = load16(o + (c0 + c) * kLanes);
              for (int i = 0; i < nk; ++i) {
                const float* vj = vpool + offs[j0 + i] + head + c0 * kLanes;
                for (int c = 0; c < cn; ++c) acc[c] += pg[i] * load16(vj + c * kLanes);
              }
              for (int c = 0; c < cn; ++c) store16(o + (c0 + c) * kLanes, acc[c]);
            }
            for (int d = nc * kLanes; d < D; ++d)
              for (int i = 0; i < nk; ++i) o[d] += pg[i] * vpool[offs[j0 + i] + head + d];
          }
        }
        for (int g = 0; g < group; ++g)
          for (int d = 0; d < D; ++d) o0[static_cast<size_t>(g) * D + d] *= inv[g];
      }
    }
  }
}

}  // namespace afs::cpu
