// The OLMo 2 forward pass on the CPU, specialised on a compile-time model config `C`
// (generated: afs_config.h). The per-layer op order is the generated layer schedule
// (run_layer, rendered from templates/layer_schedule_cpu.h.j2); this file holds the state, the
// weight binding and the ops the schedule calls.
//
// OLMo 2 block (no pre-norms; norms on the block outputs):
//   qkv = x Wqkv^T; q = rope(q_norm(q)); k = rope(k_norm(k)); cache k, v
//   x  += post_attention_norm(attention(q, K, V) Wo^T)
//   x  += post_feedforward_norm(swiglu(x Wgu^T) Wdown^T)
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "afs/backend.h"
#include "afs/engine_file.h"
#include "afs/error.h"
#include "afs/fp8.h"
#include "afs/kernels/cpu/activation.h"
#include "afs/kernels/cpu/attention.h"
#include "afs/kernels/cpu/linear.h"
#include "afs/kernels/cpu/norm.h"
#include "afs/kernels/cpu/rope.h"

namespace afs::cpu {

template <class C>
class Model final : public Backend {
 public:
  using W = typename C::Weight;
  static constexpr int H = C::kHidden, QD = C::kHeads * C::kHeadDim, KVD = C::kKvHeads * C::kHeadDim;
  static constexpr int QKV = QD + 2 * KVD, I = C::kIntermediate, V = C::kVocab, D = C::kHeadDim;

  Model(const EngineFile& f, const RuntimeOptions& opt)
      : rope_(C::kHeadDim, C::kRopeTheta, C::kRopeFactor) {
    // NOTE: every step reads every weight, so the weights live in private memory rather than in
    // the file mapping: a model.afs truncated or rewritten while the engine runs would otherwise
    // raise SIGBUS in a kernel. The copy costs a read of the file at load and makes the weights
    // anonymous memory (resident either way once the first step has run, but no longer shared
    // between processes that load the same file).
    f.read_into_memory();
    const DType wd = dtype_of<W>::value;
    embed_ = as<W>(f.expect("embed", wd, {V, H}));
    layers_.resize(C::kLayers);
    for (int l = 0; l < C::kLayers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      Layer& L = layers_[l];
      L.qkv = as<W>(f.expect(p + "qkv", wd, {QKV, H}));
      L.q_norm = as<float>(f.expect(p + "q_norm", DType::F32, {QD}));
      L.k_norm = as<float>(f.expect(p + "k_norm", DType::F32, {KVD}));
      L.o_proj = as<W>(f.expect(p + "o_proj", wd, {H, QD}));
      L.post_attention_norm = as<float>(f.expect(p + "post_attention_norm", DType::F32, {H}));
      L.gate_up = as<W>(f.expect(p + "gate_up", wd, {2 * I, H}));
      L.down_proj = as<W>(f.expect(p + "down_proj", wd, {H, I}));
      L.post_feedforward_norm = as<float>(f.expect(p + "post_feedforward_norm", DType::F32, {H}));
    }
    final_norm_ = as<float>(f.expect("final_norm", DType::F32, {H}));
    lm_head_ = as<W>(f.expect("lm_head", wd, {V, H}));
    max_ctx_ = opt.max_context > 0 ? opt.max_context : C::kMaxPositions;
    if (max_ctx_ < 1) throw_error("max_context must be >= 1, got ", max_ctx_);
    block_size_ = opt.kv_block_size;
    if (block_size_ < 1) throw_error("kv_block_size must be >= 1, got ", block_size_);
    n_blocks_ = opt.kv_blocks > 0 ? opt.kv_blocks : 4 * ((max_ctx_ + block_size_ - 1) / block_size_);
    threads_ = opt.threads;
#ifdef _OPENMP
    if (threads_ > 0) omp_set_num_threads(threads_);
#endif
    // NOTE: the pool is malloc'd, not zeroed: the OS commits pages only as blocks are first written.
    // Float32 values, or (kv_cache_dtype fp8) e4m3 bytes.
    kv_fp8_ = kv_cache_is_fp8(opt);
    const size_t values = static_cast<size_t>(n_blocks_) * block_size_ * KVD;
    const size_t bytes = values * (kv_fp8_ ? 1 : sizeof(float));
    kpool_.resize(C::kLayers);
    vpool_.resize(C::kLayers);
    for (int l = 0; l < C::kLayers; ++l) {
      kpool_[l].reset(std::malloc(bytes));
      vpool_[l].reset(std::malloc(bytes));
      if (!kpool_[l] || !vpool_[l])
        throw_error("cannot allocate the KV cache (", n_blocks_, " blocks of ", block_size_, " tokens); lower kv_blocks");
    }
  }

  const char* name() const override { return "cpu"; }
  int vocab_size() const override { return V; }
  int max_context() const override { return max_ctx_; }
  int kv_pool_blocks() const override { return n_blocks_; }
  int kv_block_size() const override { return block_size_; }

  void forward_batch(const SeqChunk* chunks, int n_chunks, float* logits) override {
    if (n_chunks <= 0) throw_error("forward_batch needs at least one sequence");
#ifdef _OPENMP
    // NOTE: OpenMP's thread count belongs to the calling thread, and steps run on the engine's
    // worker thread as well as the caller's.
    if (threads_ > 0 && omp_get_max_threads() != threads_) omp_set_num_threads(threads_);
#endif
    chunks_.assign(chunks, chunks + n_chunks);
    int T = 0;
    for (const SeqChunk& c : chunks_) {
      if (c.n <= 0) throw_error("every sequence of a batch step needs at least one token");
      if (c.pos0 < 0 || c.pos0 + c.n > max_ctx_)
        throw_error("sequence of ", c.pos0 + c.n, " tokens exceeds the context limit of ", max_ctx_);
      for (int t = 0; t < c.n; ++t)
        if (c.tokens[t] < 0 || c.tokens[t] >= V) throw_error("token id ", c.tokens[t], " is out of range [0, ", V, ")");
      T += c.n;
    }
    ensure_scratch(T);
    // Per token: its position and its KV slot.
    tok_pos_.resize(T);
    tok_slot_.resize(T);
    int t = 0;
    for (const SeqChunk& c : chunks_) {
      for (int i = 0; i < c.n; ++i, ++t) {
        const int p = c.pos0 + i;
        const int b = c.blocks[p / block_size_];
        if (b < 0 || b >= n_blocks_) throw_error("block table entry ", b, " is outside the pool of ", n_blocks_);
        tok_pos_[t] = p;
        tok_slot_[t] = static_cast<size_t>(b) * block_size_ + p % block_size_;
        const W* e = embed_ + static_cast<size_t>(c.tokens[i]) * H;
        float* xr = x_.data() + static_cast<size_t>(t) * H;
        for (int k = 0; k < H; ++k) xr[k] = to_float(e[k]);
      }
    }
    for (int l = 0; l < C::kLayers; ++l) run_layer(l, T);
    // Gather the rows that want logits, then one lm_head GEMM.
    int rows = 0, row0 = 0;
    for (const SeqChunk& c : chunks_) {
      const int first = c.logits == 2 ? 0 : c.n - 1;
      const int count = c.logits == 0 ? 0 : c.n - first;
      rms_norm(x_.data() + static_cast<size_t>(row0 + first) * H, H, count, H, final_norm_, C::kEps,
               xn_.data() + static_cast<size_t>(rows) * H, H);
      rows += count;
      row0 += c.n;
    }
    if (rows > 0) linear(xn_.data(), rows, H, lm_head_, V, logits, V);
  }

  // ---- ops called by the generated layer schedule -------------------------------------------
  // qkv_[T, QKV] = x_ Wqkv^T
  void qkv_projection(int l, int T) { linear(x_.data(), T, H, layers_[l].qkv, QKV, qkv_.data(), QKV); }

  // q_norm / k_norm over the full q and k widths, RoPE, then K and V into their pool slots.
  void qk_norm_rope_cache(int l, int T) {
    const Layer& L = layers_[l];
    float* qkv = qkv_.data();
    rms_norm(qkv, QKV, T, QD, L.q_norm, C::kEps, qkv, QKV);
    rms_norm(qkv + QD, QKV, T, KVD, L.k_norm, C::kEps, qkv + QD, QKV);
#pragma omp parallel for schedule(static) if (T > 1)
    for (int t = 0; t < T; ++t) {
      float c[D / 2], s[D / 2];
      rope_.at(tok_pos_[t], c, s);
      float* row = qkv + static_cast<size_t>(t) * QKV;
      apply_rope(row, C::kHeads, D, c, s);
      apply_rope(row + QD, C::kKvHeads, D, c, s);
      const size_t at = tok_slot_[t] * KVD;
      if (kv_fp8_) {
        uint8_t* kc = static_cast<uint8_t*>(kpool_[l].get()) + at;
        uint8_t* vc = static_cast<uint8_t*>(vpool_[l].get()) + at;
        for (int i = 0; i < KVD; ++i) kc[i] = fp8_e4m3_from_float(row[QD + i]), vc[i] = fp8_e4m3_from_float(row[QD + KVD + i]);
      } else {
        std::memcpy(static_cast<float*>(kpool_[l].get()) + at, row + QD, KVD * sizeof(float));
        std::memcpy(static_cast<float*>(vpool_[l].get()) + at, row + QD + KVD, KVD * sizeof(float));
      }
      // Compact q to [T, QD] for the attention kernel.
      std::memcpy(q_.data() + static_cast<size_t>(t) * QD, row, QD * sizeof(float));
    }
  }

  // Each sequence of the step attends over its own blocks.
  // fp8: the sequence's keys 0 .. pos0 + n - 1 are first widened to float32 in order (kv_f_, read
  // through an identity block table), so the attention is the float32 one over the rounded values.
  void attention(int l, int T) {
    size_t off = 0;
    for (const SeqChunk& c : chunks_) {
      const float* kp = static_cast<const float*>(kpool_[l].get());
      const float* vp = static_cast<const float*>(vpool_[l].get());
      const int32_t* blocks = c.blocks;
      if (kv_fp8_) {
        const int ctx = c.pos0 + c.n, nb = (ctx + block_size_ - 1) / block_size_;
        kf_.resize(static_cast<size_t>(nb) * block_size_ * KVD);
        vf_.resize(kf_.size());
        ids_.resize(nb);
        for (int b = 0; b < nb; ++b) ids_[b] = b;
        const auto* k8 = static_cast<const uint8_t*>(kpool_[l].get());
        const auto* v8 = static_cast<const uint8_t*>(vpool_[l].get());
        const std::array<float, 256>& tab = fp8_e4m3_table();
#pragma omp parallel for schedule(static) if (ctx > 64)
        for (int p = 0; p < ctx; ++p) {
          const size_t src = (static_cast<size_t>(c.blocks[p / block_size_]) * block_size_ + p % block_size_) * KVD;
          float* kd = kf_.data() + static_cast<size_t>(p) * KVD;
          float* vd = vf_.data() + static_cast<size_t>(p) * KVD;
          for (int i = 0; i < KVD; ++i) kd[i] = tab[k8[src + i]], vd[i] = tab[v8[src + i]];
        }
        kp = kf_.data(), vp = vf_.data(), blocks = ids_.data();
      }
      attention_paged(q_.data() + off * QD, c.n, C::kHeads, C::kKvHeads, D, kp, vp, block_size_, blocks, c.pos0,
                      1.0f / std::sqrt(static_cast<float>(D)), attn_.data() + off * QD);
      off += c.n;
    }
  }

  // x += post_attention_norm(attn Wo^T)
  void o_proj_norm_residual(int l, int T) {
    linear(attn_.data(), T, QD, layers_[l].o_proj, H, h_.data(), H);
    rms_norm_residual(h_.data(), T, H, layers_[l].post_attention_norm, C::kEps, x_.data());
  }

  // act = swiglu(x Wgu^T)
  void gate_up_swiglu(int l, int T) {
    linear(x_.data(), T, H, layers_[l].gate_up, 2 * I, gu_.data(), 2 * I);
    swiglu(gu_.data(), T, I, act_.data());
  }

  // x += post_feedforward_norm(act Wdown^T)
  void down_proj_norm_residual(int l, int T) {
    linear(act_.data(), T, I, layers_[l].down_proj, H, h_.data(), H);
    rms_norm_residual(h_.data(), T, H, layers_[l].post_feedforward_norm, C::kEps, x_.data());
  }

 private:
  struct Layer {
    const W* qkv;
    const float* q_norm;
    const float* k_norm;
    const W* o_proj;
    const float* post_attention_norm;
    const W* gate_up;
    const W* down_proj;
    const float* post_feedforward_norm;
  };

  template <class T>
  static const T* as(const TensorEntry& e) {
    return reinterpret_cast<const T*>(e.data);
  }

  void run_layer(int l, int T);  // generated: the layer schedule

  void ensure_scratch(int T) {
    if (T <= scratch_tokens_) return;
    scratch_tokens_ = T;
    const size_t t = static_cast<size_t>(T);
    x_.resize(t * H);
    xn_.resize(t * H);
    h_.resize(t * H);
    qkv_.resize(t * QKV);
    q_.resize(t * QD);
    attn_.resize(t * QD);
    gu_.resize(t * 2 * I);
    act_.resize(t * I);
  }

  RopeTable rope_;
  const W* embed_ = nullptr;
  const W* lm_head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
  };
  int max_ctx_ = 0, scratch_tokens_ = 0, block_size_ = 16, n_blocks_ = 0, threads_ = 0;
  // Per layer: [blocks * block_size, KVD] of float32, or of e4m3 bytes (kv_fp8_).
  std::vector<std::unique_ptr<void, FreeDeleter>> kpool_, vpool_;
  bool kv_fp8_ = false;
  std::vector<float> kf_, vf_;  // fp8: one sequence's keys and values widened for the attention
  std::vector<int32_t> ids_;    // fp8: the identity block table over kf_ / vf_
  std::vector<SeqChunk> chunks_;  // the step being run
  std::vector<int> tok_pos_;
  std::vector<size_t> tok_slot_;
  std::vector<float> x_, xn_, h_, qkv_, q_, attn_, gu_, act_;
};

}  // namespace afs::cpu
