// The OLMo 2 forward pass on an NVIDIA GPU, specialised on a compile-time model config `C`
// (generated afs_config.h). Same block structure and op order as the CPU model; the layer schedule
// is generated (templates/layer_schedule_cuda.cu.j2).
//
// Paged and batched: K/V live in a pool of fixed-size blocks (the engine's BlockPool hands them
// out); a step runs the chunks of many sequences at once (continuous batching, chunked prefill).
// Weights are one device copy of model.afs's data section (tensor offsets unchanged), the residual
// stream is float32, GEMM inputs and the KV cache are the weight type (bf16 / fp16), GEMM outputs
// float32.
//
// A step's metadata (tokens, positions, KV slots, sequences, block tables, sampling parameters) is
// packed on the host into pinned memory and sent in one copy; every kernel reads it on the device.
// Decode-only steps of B sequences therefore replay a CUDA graph captured once per batch bucket
// (B padded up to the bucket with rows that write to a scratch block). Tokens are sampled on the
// device; only their ids come back, unless a caller asks for logits.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "afs/backend.h"
#include "afs/engine_file.h"
#include "afs/error.h"
#include "afs/kernels/cuda/attention.cuh"
#include "afs/kernels/cuda/attention_sm90.cuh"
#include "afs/kernels/cuda/elementwise.cuh"
#include "afs/kernels/cuda/linear.cuh"
#include "afs/kernels/cuda/sampling.cuh"

namespace afs::cuda {

// Batch sizes decode graphs are captured for (a step of B sequences runs the next bucket up).
inline constexpr int kGraphBuckets[] = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256};

// Reports, once, a step that has been in flight for longer than AFS_CUDA_STALL_REPORT_S seconds
// (default 60; 0 turns it off) on stderr, with its shape: a kernel that never finishes otherwise
// leaves only a process waiting in cudaStreamSynchronize, with nothing to say which step it was.
// The step path only stores a few atomics; a thread checks them every few seconds.
class StallReporter {
 public:
  StallReporter() {
    if (const char* v = std::getenv("AFS_CUDA_STALL_REPORT_S"); v && *v) {
      char* end = nullptr;
      limit_s_ = std::strtod(v, &end);
      if (*end != '\0' || !(limit_s_ >= 0.0))
        throw_error("AFS_CUDA_STALL_REPORT_S=", v, ": expected seconds >= 0 (0 turns the stall report off)");
    }
    if (limit_s_ > 0) thread_ = std::thread([this] { watch(); });
  }
  ~StallReporter() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  StallReporter(const StallReporter&) = delete;
  StallReporter& operator=(const StallReporter&) = delete;

  void begin(int tokens, int decode_rows, int bucket) {
    tokens_.store(tokens, std::memory_order_relaxed);
    decode_rows_.store(decode_rows, std::memory_order_relaxed);
    bucket_.store(bucket, std::memory_order_relaxed);
    seq_.fetch_add(1, std::memory_order_relaxed);
    started_ns_.store(now_ns(), std::memory_order_release);
  }
  void end() { started_ns_.store(0, std::memory_order_relaxed); }

 private:
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void watch() {
    std::unique_lock<std::mutex> lock(mu_);
    uint64_t reported = 0;
    while (!cv_.wait_for(lock, std::chrono::seconds(5), [this] { return stop_; })) {
      const int64_t t0 = started_ns_.load(std::memory_order_acquire);
      const uint64_t seq = seq_.load(std::memory_order_relaxed);
      if (t0 == 0 || seq == reported) continue;
      const double secs = static_cast<double>(now_ns() - t0) * 1e-9;
      if (secs < limit_s_) continue;
      reported = seq;
      char how[32] = "eager";
      if (const int bucket = bucket_.load(std::memory_order_relaxed)) std::snprintf(how, sizeof how, "graph of %d", bucket);
      std::fprintf(stderr,
                   "afs: a CUDA step of %d tokens (%d decode rows, %s) has not finished after %.0f s; a kernel may "
                   "be hung (AFS_CUDA_STALL_REPORT_S sets when this is reported)\n",
                   tokens_.load(std::memory_order_relaxed), decode_rows_.load(std::memory_order_relaxed), how, secs);
      std::fflush(stderr);
    }
  }

  double limit_s_ = 60.0;
  std::atomic<int64_t> started_ns_{0};  // 0: no step in flight
  std::atomic<uint64_t> seq_{0};
  std::atomic<int> tokens_{0}, decode_rows_{0}, bucket_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

template <class C>
class Model final : public Backend {
 public:
  using W = typename C::Weight;
  using T = typename device_type<W>::type;
  static constexpr int H = C::kHidden, QD = C::kHeads * C::kHeadDim, KVD = C::kKvHeads * C::kHeadDim;
  static constexpr int QKV = QD + 2 * KVD, I = C::kIntermediate, V = C::kVocab, D = C::kHeadDim;
  static constexpr int G = C::kHeads / C::kKvHeads;
  static constexpr int kMaxTokens = 2048;  // tokens per step (bounds the scratch buffers)
  static constexpr int kMaxSeqs = 256;     // sequences per step
  static constexpr int kLogitRows = 256;   // logits rows computed at once
  static constexpr int kMaxSlots = 1 << 30;  // KV slots (tokens) in the pool: slot ids are int32
  static_assert(kMaxSeqs <= kLogitRows, "a sampled step's logits rows must fit one lm_head slice");

  Model(const EngineFile& f, const RuntimeOptions& opt) : graphs_enabled_(opt.cuda_graphs) {
    int dev_count = 0;
    if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0)
      throw_error("this engine was built for CUDA but no CUDA GPU is available (", cudaGetErrorString(cudaGetLastError()), ")");
    AFS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    upload_weights(f);
    const DType wd = dtype_of<W>::value;
    embed_ = dev<T>(f.expect("embed", wd, {V, H}));
    layers_.resize(C::kLayers);
    for (int l = 0; l < C::kLayers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      Layer& L = layers_[l];
      L.qkv = dev<T>(f.expect(p + "qkv", wd, {QKV, H}));
      L.q_norm = dev<float>(f.expect(p + "q_norm", DType::F32, {QD}));
      L.k_norm = dev<float>(f.expect(p + "k_norm", DType::F32, {KVD}));
      L.o_proj = dev<T>(f.expect(p + "o_proj", wd, {H, QD}));
      L.post_attention_norm = dev<float>(f.expect(p + "post_attention_norm", DType::F32, {H}));
      L.gate_up = dev<T>(f.expect(p + "gate_up", wd, {2 * I, H}));
      L.down_proj = dev<T>(f.expect(p + "down_proj", wd, {H, I}));
      L.post_feedforward_norm = dev<float>(f.expect(p + "post_feedforward_norm", DType::F32, {H}));
    }
    final_norm_ = dev<float>(f.expect("final_norm", DType::F32, {H}));
    lm_head_ = dev<T>(f.expect("lm_head", wd, {V, H}));

    max_ctx_ = opt.max_context > 0 ? opt.max_context : C::kMaxPositions;
    if (max_ctx_ < 1) throw_error("max_context must be >= 1, got ", max_ctx_);
    bs_ = opt.kv_block_size;
    if (bs_ < 1 || bs_ > 1024 || (bs_ & (bs_ - 1)))
      throw_error("kv_block_size must be a power of two in [1, 1024] on CUDA, got ", bs_);
    while ((1 << bs_log2_) < bs_) ++bs_log2_;
    max_blocks_per_seq_ = (max_ctx_ + bs_ - 1) / bs_;
    n_splits_ = (max_ctx_ + kDecodeSplitAlign - 1) / kDecodeSplitAlign;  // the most a step uses
    kv_fp8_ = kv_cache_is_fp8(opt);
    // fp8 K/V: the 16-bit staging the prefill attentions read (qk_norm_rope_kv and kv_stage_gather
    // fill it), one layer at a time: one sequence of max_context and a full step of tokens, plus a
    // partial block per piece. run() keeps each step's prefill pieces within it.
    stage_blocks_ = kv_fp8_ ? (max_ctx_ + kMaxTokens + bs_ - 1) / bs_ + kMaxSeqs : 0;

    // RoPE (cos, sin) per position, computed as the CPU backend and HF do: float32 inverse
    // frequencies, float32 angle p * f_i.
    {
      std::vector<float> inv_freq(D / 2);
      for (int i = 0; i < D / 2; ++i)
        inv_freq[i] = 1.0f / std::pow(static_cast<float>(C::kRopeTheta), static_cast<float>(2 * i) / D) /
                      static_cast<float>(C::kRopeFactor);
      std::vector<float2> table(size_t(max_ctx_) * (D / 2));
      for (int p = 0; p < max_ctx_; ++p)
        for (int i = 0; i < D / 2; ++i) {
          const float a = static_cast<float>(p) * inv_freq[i];
          table[size_t(p) * (D / 2) + i] = make_float2(std::cos(a), std::sin(a));
        }
      rope_ = alloc<float2>(table.size());
      AFS_CUDA_CHECK(cudaMemcpy(rope_, table.data(), sizeof(float2) * table.size(), cudaMemcpyHostToDevice));
    }
    interleave_gate_up_weights();
    x_ = alloc<float>(size_t(kMaxTokens) * H);
    h_ = alloc<float>(size_t(kMaxTokens) * H);
    xa_ = alloc<T>(size_t(kMaxTokens) * H);
    qkv_ = alloc<float>(size_t(kMaxTokens) * QKV);
    q_ = alloc<T>(size_t(kMaxTokens) * QD);
    attn_ = alloc<T>(size_t(kMaxTokens) * QD);
    act_ = alloc<T>(size_t(kMaxTokens) * I);
    logits_d_ = alloc<float>(size_t(kLogitRows) * V);
    part_ml_ = alloc<float>(size_t(kMaxSeqs) * C::kHeads * n_splits_ * 2);
    part_acc_ = alloc<float>(size_t(kMaxSeqs) * C::kHeads * n_splits_ * D);
    decode_done_ = alloc<int>(size_t(kMaxSeqs) * C::kKvHeads);  // attention_decode's combine counters
    AFS_CUDA_CHECK(cudaMemsetAsync(decode_done_, 0, sizeof(int) * kMaxSeqs * C::kKvHeads, stream_));
    const Layout cap = layout(kMaxTokens, kMaxTokens, kMaxSeqs, kMaxSeqs, kMaxTokens / attn::kBr + kMaxSeqs,
                              size_t(kMaxSeqs) * max_blocks_per_seq_, kv_fp8_ ? size_t(stage_blocks_) : 0);
    if (kv_fp8_) {
      kstage_ = alloc<T>(size_t(stage_blocks_) * bs_ * KVD);
      vstage_ = alloc<T>(size_t(stage_blocks_) * bs_ * KVD);
    }
    meta_bytes_ = cap.bytes;
    meta_d_ = alloc<unsigned char>(meta_bytes_);
    AFS_CUDA_CHECK(cudaMallocHost(&meta_h_, meta_bytes_));
    AFS_CUDA_CHECK(cudaMallocHost(&tokens_h_, sizeof(int32_t) * kLogitRows));
    tokens_d_ = alloc<int32_t>(kLogitRows);
    arg_val_ = alloc<float>(size_t(kLogitRows) * kArgmaxParts);
    arg_idx_ = alloc<int>(size_t(kLogitRows) * kArgmaxParts);
    linear_setup<T>();
    // Prefill attention: the sm90a kernel (128-row tiles) where the GEMM's sm90a code runs, the
    // head dim is 64 or 128 and KV blocks hold at least 8 tokens; else attention_prefill.
    if (wgmma_enabled() && !env_is("AFS_CUDA_SM90_ATTENTION", "0") && (D == 64 || D == 128) && bs_ >= 8)
      tile_rows_ = sm90::kAttnRows;
    out16_enabled_ = !env_is("AFS_CUDA_OUT16", "0");
    step_times_ = env_is("AFS_CUDA_STEP_TIMES", "1");
    fused_combine_ = !env_is("AFS_CUDA_FUSED_COMBINE", "0");
    // Fused decode q/k (see fused_qk): by default for decode-only steps of at most
    // kFusedDecodeMaxRows rows; AFS_CUDA_FUSED_DECODE=1 for every decode-only step, =0 never.
    fused_decode_rows_ = env_is("AFS_CUDA_FUSED_DECODE", "0")   ? 0
                         : env_is("AFS_CUDA_FUSED_DECODE", "1") ? kMaxTokens
                                                                : kFusedDecodeMaxRows;

    // The KV pool: an explicit block count, or what the memory fraction leaves after the rest.
    const size_t slot_elems = size_t(KVD) * C::kLayers;  // one token's K (or V), all layers
    const size_t block_bytes = 2 * slot_elems * bs_ * (kv_fp8_ ? sizeof(kv_fp8) : sizeof(T));
    if (opt.kv_blocks > 0) {
      n_blocks_ = opt.kv_blocks;
    } else {
      if (!(opt.gpu_memory_fraction > 0.f && opt.gpu_memory_fraction <= 1.f))
        throw_error("gpu_memory_fraction must be in (0, 1], got ", opt.gpu_memory_fraction);
      size_t free_b = 0, total_b = 0;
      AFS_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      const double keep = (1.0 - opt.gpu_memory_fraction) * static_cast<double>(total_b);
      const double budget = static_cast<double>(free_b) - keep;
      const double fit = budget > 0 ? budget / static_cast<double>(block_bytes) : 0.0;
      n_blocks_ = static_cast<int>(std::min<double>(fit, kMaxSlots / bs_ - 1));
      if (n_blocks_ < max_blocks_per_seq_)
        throw_error("the GPU has room for ", n_blocks_, " KV blocks of ", bs_, " tokens (", free_b / 1e9,
                    " GB free of ", total_b / 1e9, " GB, gpu_memory_fraction ", opt.gpu_memory_fraction,
                    "), fewer than one sequence of max_context ", max_ctx_,
                    " needs; lower max_context, raise gpu_memory_fraction, or pass kv_blocks");
    }
    if (n_blocks_ > kMaxSlots / bs_ - 1)
      throw_error("kv_blocks = ", n_blocks_, " blocks of ", bs_, " tokens exceeds the ", kMaxSlots, "-slot limit");
    // One extra block: the scratch block that padding rows of a graph bucket write to.
    const size_t pool_elems = size_t(n_blocks_ + 1) * bs_ * KVD;
    if (kv_fp8_) {
      kpool_ = alloc<kv_fp8>(pool_elems * C::kLayers);
      vpool_ = alloc<kv_fp8>(pool_elems * C::kLayers);
    } else {
      kpool_ = alloc<T>(pool_elems * C::kLayers);
      vpool_ = alloc<T>(pool_elems * C::kLayers);
    }
    layer_pool_elems_ = pool_elems;
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  ~Model() override {
    for (auto& [b, g] : graphs_) cudaGraphExecDestroy(g);
    for (void* p : allocations_) cudaFree(p);
    if (meta_h_) cudaFreeHost(meta_h_);
    if (tokens_h_) cudaFreeHost(tokens_h_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  int vocab_size() const override { return V; }
  int max_context() const override { return max_ctx_; }
  int kv_pool_blocks() const override { return n_blocks_; }
  int kv_block_size() const override { return bs_; }
  bool samples_on_device() const override { return true; }

  void forward_batch(const SeqChunk* chunks, int n_chunks, float* logits) override {
    run(chunks, n_chunks, nullptr, nullptr, logits);
  }
  void forward_batch_sample(const SeqChunk* chunks, int n_chunks, const RowSampling* rows, int32_t* tokens,
                            float* logits) override {
    for (int k = 0; k < n_chunks; ++k)
      if (chunks[k].logits == 2) throw_error("forward_batch_sample: every-row logits are not sampled");
    run(chunks, n_chunks, rows, tokens, logits);
  }

  // ---- ops called by the generated layer schedule (Tn token rows of this step) -----------------
  // Projection outputs (qkv_, h_): float32, or 16-bit in steps of more than kOut16Rows rows
  // (out16_), rounded as HF's bf16 matmuls round them. That halves the bytes the prefill GEMMs
  // write and the row kernels after them read; smaller steps keep float32, where the GEMMs split
  // K over a float32 sum.
  // Decode-sized steps may split a projection's K over float32 planes (linear_planes) that the row
  // kernel after it sums: qkv_planes_ / the norm's planes say how many.
  void qkv_projection(int l, int Tn) {
    qkv_planes_ = 1;
    if (out16_) linear<T>(xa_, Tn, H, layers_[l].qkv, QKV, reinterpret_cast<T*>(qkv_), QKV, stream_);
    else qkv_planes_ = linear_planes<T>(xa_, Tn, H, layers_[l].qkv, QKV, qkv_, long(Tn) * QKV, max_planes(Tn), stream_);
  }

  void qk_norm_rope_cache(int l, int Tn) {
    if (fused_qk()) return;  // attention_decode does it (DecodeQk)
    const int per = qk_heads_per_block(Tn, C::kHeads, C::kKvHeads, sm_count());
    const int chunks = (C::kHeads + per - 1) / per + (C::kKvHeads + per - 1) / per;
    with_kv([&](auto kv) {
      using KV = decltype(kv);
      auto go = [&](auto kernel, const auto* qkv) {
        launch(kernel, dim3(Tn, chunks), dim3(kQkThreads), 0, stream_, qkv, qkv_planes_, long(Tn) * QKV, C::kHeads,
               C::kKvHeads, per, layers_[l].q_norm, layers_[l].k_norm, rope_, C::kEps, cur_.pos, cur_.slot, q_,
               kpool<KV>(l), vpool<KV>(l), cur_.st_slot, cur_.st_slot ? kstage_ : nullptr,
               cur_.st_slot ? vstage_ : nullptr);
      };
      if (out16_) go(qk_norm_rope_kv<T, D, T, KV>, reinterpret_cast<const T*>(qkv_));
      else go(qk_norm_rope_kv<T, D, float, KV>, static_cast<const float*>(qkv_));
    });
  }

  void attention(int l, int Tn) {
    const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));
    if (cur_.n_dec > 0) {
      // Enough (split, kv head, sequence) blocks for two waves; whole contexts once the batch
      // fills the GPU.
      const int want = (2 * sm_count() + C::kKvHeads * cur_.n_dec - 1) / (C::kKvHeads * cur_.n_dec);
      const int splits = std::clamp(want, 1, n_splits_);
      const int per = (max_ctx_ + splits - 1) / splits;
      const int split_keys = (per + kDecodeSplitAlign - 1) / kDecodeSplitAlign * kDecodeSplitAlign;
      const int grid_splits = (max_ctx_ + split_keys - 1) / split_keys;
      // A grid of about two blocks per SM (batch 1-2) runs faster with the smaller ring.
      const dim3 grid(grid_splits, C::kKvHeads, cur_.n_dec);
      const bool small_grid = long(grid_splits) * C::kKvHeads * cur_.n_dec <= 2L * sm_count();
      // The decode attention combines its splits itself unless AFS_CUDA_FUSED_COMBINE=0.
      int* done = fused_combine_ ? decode_done_ : nullptr;
      with_kv([&](auto kv) {
        using KV = decltype(kv);
        auto go = [&](auto kernel, const DecodeQk& qk) {
          launch(kernel, grid, dim3(kDecodeThreads), 0, stream_, static_cast<const T*>(q_), kpool<KV>(l), vpool<KV>(l),
                 cur_.seqs, cur_.dec, cur_.bt, bs_log2_, C::kKvHeads, split_keys, scale_log2, part_ml_, part_acc_, qk,
                 done, attn_);
        };
        if (fused_qk()) {
          const DecodeQk qk{qkv_,  qkv_planes_, long(Tn) * QKV, layers_[l].q_norm, layers_[l].k_norm,
                            rope_, C::kEps,     cur_.pos,       cur_.slot};
          if (small_grid) go(attention_decode<T, D, G, DecodeTiling<4, 2>, true, KV>, qk);
          else go(attention_decode<T, D, G, DecodeTilingH100, true, KV>, qk);
        } else if (small_grid) {
          go(attention_decode<T, D, G, DecodeTiling<4, 2>, false, KV>, DecodeQk{});
        } else {
          go(attention_decode<T, D, G, DecodeTilingH100, false, KV>, DecodeQk{});
        }
      });
      if (!done)
        launch(attention_decode_combine<T, D>, dim3(cur_.n_dec, C::kHeads), dim3(D), 0, stream_, part_ml_, part_acc_,
               cur_.seqs, cur_.dec, grid_splits, split_keys, attn_);
    }
    if (cur_.n_tiles == 0) return;
    // The prefill attentions read 16-bit pools: the layer's own, or (fp8) the staging copy of the
    // prefill sequences' keys, through its own tables.
    const T* kp = kv_fp8_ ? kstage_ : kpool<T>(l);
    const T* vp = kv_fp8_ ? vstage_ : vpool<T>(l);
    const SeqMeta* seqs = kv_fp8_ ? cur_.st_seqs : cur_.seqs;
    const int32_t* bt = kv_fp8_ ? cur_.st_bt : cur_.bt;
    const size_t slots = kv_fp8_ ? size_t(stage_blocks_) * bs_ : layer_pool_elems_ / KVD;
    if (kv_fp8_ && cur_.n_pf > 0) {  // earlier keys of chunked / prefix-hit pieces (fresh ones: above)
      const long items = long(cur_.max_pf_pos0) * (KVD / 16);
      const long want = (4L * sm_count() + cur_.n_pf - 1) / cur_.n_pf;
      const int gy = int(std::clamp<long>(want, 1, (items + kStageThreads - 1) / kStageThreads));
      launch(kv_stage_gather<T>, dim3(cur_.n_pf, gy), dim3(kStageThreads), 0, stream_,
             static_cast<const kv_fp8*>(kpool<kv_fp8>(l)), static_cast<const kv_fp8*>(vpool<kv_fp8>(l)), cur_.seqs,
             cur_.st_seqs, cur_.pf, cur_.bt, cur_.st_bt, bs_log2_, KVD, kstage_, vstage_);
    }
    if (tile_rows_ == sm90::kAttnRows) {
      if constexpr (D == 64 || D == 128)
        sm90::attention_prefill_sm90<T, D>(q_, kp, vp, slots, seqs, cur_.tiles, cur_.n_tiles, bt, bs_log2_, C::kHeads,
                                           C::kKvHeads, scale_log2, attn_, stream_);
    } else {
      launch(attention_prefill<T, D>, dim3(C::kHeads, cur_.n_tiles), dim3(128), 0, stream_, q_, kp, vp, seqs,
             cur_.tiles, bt, bs_log2_, C::kHeads, C::kKvHeads, scale_log2, attn_);
    }
  }

  void o_proj_norm_residual(int l, int Tn) {
    project_norm_residual(attn_, QD, layers_[l].o_proj, layers_[l].post_attention_norm, Tn);
  }

  void gate_up_swiglu(int l, int Tn) { linear_swiglu<T>(xa_, Tn, H, layers_[l].gate_up, I, act_, stream_); }

  void down_proj_norm_residual(int l, int Tn) {
    project_norm_residual(act_, I, layers_[l].down_proj, layers_[l].post_feedforward_norm, Tn);
  }

 private:
  // h = in W^T (K columns in), then x += rmsnorm(h) w and xa = x. A few rows: one block of many
  // threads per row; many rows: 4 groups of 4 per thread, more rows in flight per SM.
  void project_norm_residual(const T* in, int K, const T* w, const float* norm_w, int Tn) {
    int planes = 1;
    auto norm = [&](auto kernel, const auto* h, int v) {
      launch(kernel, dim3(Tn), dim3(rms_norm_threads(H, v)), 0, stream_, h, planes, long(Tn) * H, norm_w, H, C::kEps,
             x_, xa_);
    };
    if (out16_) {
      T* h16 = reinterpret_cast<T*>(h_);
      linear<T>(in, Tn, K, w, H, h16, H, stream_);
      norm(rms_norm_residual<T, T, 4>, static_cast<const T*>(h16), 4);
      return;
    }
    planes = linear_planes<T>(in, Tn, K, w, H, h_, long(Tn) * H, max_planes(Tn), stream_);
    if (Tn >= 2 * sm_count()) norm(rms_norm_residual<T, float, 4>, static_cast<const float*>(h_), 4);
    else norm(rms_norm_residual<T, float, 1>, static_cast<const float*>(h_), 1);
  }

  // Whether this step's decode attention does the q/k norm, RoPE and K/V write itself (decode-only
  // steps of at most fused_decode_rows_ rows, float32 qkv): qk_norm_rope_cache then launches
  // nothing. OLMo 2's q/k norm spans the whole projection row, so every (row, kv head) block of the
  // fused kernel reads the full q and k rows: 44 us less per step at 1 row on an H100 (one launch
  // and its wait per layer fewer), 0.33 ms more at 64 rows (benchmarks/NOTES.md, v11).
  // fp8 K/V: staging blocks a prefill piece of n tokens at pos0 takes (decode rows take none).
  int stage_need(int pos0, int n) const { return kv_fp8_ && n > 1 ? (pos0 + n + bs_ - 1) / bs_ : 0; }

  bool fused_qk() const {
    return cur_.n_tiles == 0 && cur_.n_dec > 0 && cur_.n_dec <= fused_decode_rows_ && !out16_;
  }
  static constexpr int kFusedDecodeMaxRows = 4;

  // Planes of Tn rows that fit the kMaxTokens-row scratch buffers (qkv_, h_).
  static int max_planes(int Tn) { return std::min(4, kMaxTokens / std::max(Tn, 1)); }

  struct Layer {
    const T* qkv;
    const float* q_norm;
    const float* k_norm;
    const T* o_proj;
    const float* post_attention_norm;
    const T* gate_up;
    const T* down_proj;
    const float* post_feedforward_norm;
  };

  // Byte offsets of the metadata sections for T token rows, R logits rows, S sequences, n_dec
  // decode rows, n_tiles prefill tiles and nbt block-table entries.
  struct Layout {
    size_t tokens, pos, slot, rows, params, seqs, dec, tiles, bt, st_seqs, pf, st_bt, st_slot, bytes;
  };
  // nst: staging block-table entries (fp8 K/V; 0 without), with S staging SeqMetas, S pf entries
  // and T_ staging slots.
  static Layout layout(int T_, int R, int S, int n_dec, int n_tiles, size_t nbt, size_t nst = 0) {
    auto up = [](size_t v) { return (v + 15) & ~size_t(15); };
    Layout L{};
    size_t o = 0;
    L.params = o, o = up(o + sizeof(DeviceSamplingParams) * R);
    L.seqs = o, o = up(o + sizeof(SeqMeta) * S);
    L.tiles = o, o = up(o + sizeof(int2) * n_tiles);
    L.tokens = o, o = up(o + sizeof(int32_t) * T_);
    L.pos = o, o = up(o + sizeof(int32_t) * T_);
    L.slot = o, o = up(o + sizeof(int32_t) * T_);
    L.rows = o, o = up(o + sizeof(int32_t) * R);
    L.dec = o, o = up(o + sizeof(int32_t) * n_dec);
    L.bt = o, o = up(o + sizeof(int32_t) * nbt);
    const int ss = nst ? S : 0;
    L.st_seqs = o, o = up(o + sizeof(SeqMeta) * ss);
    L.pf = o, o = up(o + sizeof(int32_t) * ss);
    L.st_bt = o, o = up(o + sizeof(int32_t) * nst);
    L.st_slot = o, o = up(o + sizeof(int32_t) * (nst ? T_ : 0));
    L.bytes = o;
    return L;
  }

  // Device pointers and counts of the step being run.
  struct Step {
    int T = 0, R = 0, n_dec = 0, n_tiles = 0, n_pf = 0, max_pf_pos0 = 0;
    const int32_t *tokens = nullptr, *pos = nullptr, *slot = nullptr, *rows = nullptr, *dec = nullptr, *bt = nullptr;
    const SeqMeta* seqs = nullptr;
    // fp8 K/V: the prefill pieces with earlier keys (pf: pos0 > 0, the largest pos0), every prefill
    // piece's staging SeqMeta and block table, and each token's staging slot (-1: decode rows).
    const int32_t *pf = nullptr, *st_bt = nullptr, *st_slot = nullptr;
    const SeqMeta* st_seqs = nullptr;
    const int2* tiles = nullptr;
    const DeviceSamplingParams* params = nullptr;
  };

  // A piece of a chunk that fits one step.
  struct Piece {
    const int32_t* tokens;
    int n, pos0;
    const int32_t* blocks;
    int logits;  // 0, 1 (last row), 2 (every row)
    int row;     // first logits row (over the whole call) of this piece
  };

  void run_layer(int l, int Tn);  // generated: the layer schedule

  void run(const SeqChunk* chunks, int n_chunks, const RowSampling* rows, int32_t* tokens_out, float* logits_out) {
    // Validate everything before any work: a bad chunk must not leave half a batch written.
    for (int k = 0; k < n_chunks; ++k) {
      const SeqChunk& c = chunks[k];
      if (c.n < 1 || c.pos0 < 0) throw_error("forward: chunk ", k, " has ", c.n, " tokens at position ", c.pos0);
      if (c.pos0 + c.n > max_ctx_)
        throw_error("sequence of ", c.pos0 + c.n, " tokens exceeds the context limit of ", max_ctx_);
      for (int t = 0; t < c.n; ++t)
        if (c.tokens[t] < 0 || c.tokens[t] >= V) throw_error("token id ", c.tokens[t], " is out of range [0, ", V, ")");
      for (int b = 0; b < (c.pos0 + c.n + bs_ - 1) / bs_; ++b)
        if (c.blocks[b] < 0 || c.blocks[b] >= n_blocks_)
          throw_error("forward: block ", c.blocks[b], " is outside the KV pool of ", n_blocks_, " blocks");
    }
    std::vector<Piece> step;
    int step_tokens = 0, step_stage = 0, row = 0, host_row = 0;
    auto flush = [&] {
      if (step.empty()) return;
      run_step(step, rows, tokens_out, logits_out, host_row);
      step.clear();
      step_tokens = step_stage = 0;
    };
    for (int k = 0; k < n_chunks; ++k) {
      const SeqChunk& c = chunks[k];
      for (int off = 0; off < c.n;) {
        if (step_tokens == kMaxTokens || static_cast<int>(step.size()) == kMaxSeqs) flush();
        int n = std::min(c.n - off, kMaxTokens - step_tokens);
        if (step_stage + stage_need(c.pos0 + off, n) > stage_blocks_) {  // fits once alone (stage_blocks_)
          flush();
          n = std::min(c.n - off, kMaxTokens);
        }
        step_stage += stage_need(c.pos0 + off, n);
        const int lg = c.logits == 2 ? 2 : (c.logits == 1 && off + n == c.n ? 1 : 0);
        step.push_back(Piece{c.tokens + off, n, c.pos0 + off, c.blocks, lg, row});
        row += lg == 2 ? n : lg;
        step_tokens += n;
        off += n;
      }
    }
    flush();
  }

  // One step over `pieces`: pack the metadata, run (a graph for decode-only steps), sample.
  void run_step(const std::vector<Piece>& pieces, const RowSampling* rows, int32_t* tokens_out, float* logits_out,
                int& host_row) {
    const auto t_enter = std::chrono::steady_clock::now();
    const int S = static_cast<int>(pieces.size());
    int T_ = 0, R = 0, n_dec = 0, n_tiles = 0;
    size_t nbt = 0, nst = 0;
    bool decode_only = rows != nullptr;
    for (const Piece& p : pieces) {
      T_ += p.n;
      R += p.logits == 2 ? p.n : p.logits;
      if (p.n == 1) ++n_dec;
      else n_tiles += (p.n + tile_rows_ - 1) / tile_rows_;
      nbt += (p.pos0 + p.n + bs_ - 1) / bs_;
      nst += stage_need(p.pos0, p.n);
      decode_only = decode_only && p.n == 1 && p.logits == 1;
    }
    int bucket = 0;
    if (decode_only && graphs_enabled_)
      for (int b : kGraphBuckets)
        if (b >= S) {
          bucket = b;
          break;
        }
    const int Sp = bucket ? bucket : S;  // padded sequence count
    if (bucket) T_ = R = n_dec = Sp;
    stall_.begin(T_, n_dec, bucket);
    struct StallScope {
      StallReporter& r;
      ~StallScope() { r.end(); }
    } stall_scope{stall_};
    const Layout L = bucket ? layout(Sp, Sp, Sp, Sp, 0, size_t(Sp) * max_blocks_per_seq_)
                            : layout(T_, R, S, n_dec, n_tiles, nbt, nst);
    unsigned char* h = meta_h_;
    auto* tok = reinterpret_cast<int32_t*>(h + L.tokens);
    auto* pos = reinterpret_cast<int32_t*>(h + L.pos);
    auto* slot = reinterpret_cast<int32_t*>(h + L.slot);
    auto* rws = reinterpret_cast<int32_t*>(h + L.rows);
    auto* dec = reinterpret_cast<int32_t*>(h + L.dec);
    auto* bt = reinterpret_cast<int32_t*>(h + L.bt);
    auto* seqs = reinterpret_cast<SeqMeta*>(h + L.seqs);
    auto* tiles = reinterpret_cast<int2*>(h + L.tiles);
    auto* params = reinterpret_cast<DeviceSamplingParams*>(h + L.params);
    auto* st_seqs = reinterpret_cast<SeqMeta*>(h + L.st_seqs);
    auto* pf = reinterpret_cast<int32_t*>(h + L.pf);
    auto* st_bt = reinterpret_cast<int32_t*>(h + L.st_bt);
    auto* st_slot = reinterpret_cast<int32_t*>(h + L.st_slot);
    int t = 0, r = 0, d = 0, ti = 0, b = 0, n_pf = 0, sb = 0, max_pf_pos0 = 0;
    row_global_.clear();  // the call-wide logits row of each of this step's rows (padding has none)
    for (int s = 0; s < S; ++s) {
      const Piece& p = pieces[s];
      const int nb = (p.pos0 + p.n + bs_ - 1) / bs_;
      seqs[s] = SeqMeta{t, p.n, p.pos0, b};
      std::memcpy(bt + b, p.blocks, sizeof(int32_t) * nb);
      for (int i = 0; i < p.n; ++i) {
        const int ps = p.pos0 + i;
        tok[t + i] = p.tokens[i];
        pos[t + i] = ps;
        slot[t + i] = (p.blocks[ps >> bs_log2_] << bs_log2_) + (ps & (bs_ - 1));
      }
      const int first = p.logits == 2 ? 0 : p.n - p.logits;  // rows with logits: all, the last, or none
      for (int i = first; i < p.n; ++i) {
        rws[r++] = t + i;
        row_global_.push_back(p.row + i - first);
      }
      if (p.n == 1) dec[d++] = s;
      else
        for (int q0 = 0; q0 < p.n; q0 += tile_rows_) tiles[ti++] = make_int2(s, q0);
      if (nst) {  // fp8 K/V: a prefill piece's staging blocks are sb .. sb + nb - 1, in order
        for (int i = 0; i < p.n; ++i) st_slot[t + i] = p.n > 1 ? (sb << bs_log2_) + p.pos0 + i : -1;
        if (p.n > 1) {
          st_seqs[s] = SeqMeta{t, p.n, p.pos0, sb};
          for (int i = 0; i < nb; ++i) st_bt[sb + i] = sb + i;
          sb += nb;
          if (p.pos0 > 0) pf[n_pf++] = s, max_pf_pos0 = std::max(max_pf_pos0, p.pos0);
        }
      }
      t += p.n;
      b += nb;
    }
    for (int s = S; s < Sp; ++s) {  // bucket padding: token 0 at position 0 of the scratch block
      seqs[s] = SeqMeta{s, 1, 0, b};
      bt[b++] = n_blocks_;
      tok[s] = 0, pos[s] = 0, slot[s] = n_blocks_ << bs_log2_;
      rws[s] = s;
      dec[d++] = s;
    }
    const int R_real = static_cast<int>(row_global_.size());
    if (rows) {
      for (int i = 0; i < R; ++i) {
        DeviceSamplingParams& dp = params[i];
        dp = DeviceSamplingParams{0.f, 0, 1.f, 0.f, 0, 0, 1};
        if (i >= R_real) continue;
        const RowSampling& rs = rows[row_global_[i]];
        dp.step = rs.step;
        if (!rs.params) continue;
        dp.temperature = rs.params->temperature, dp.top_k = rs.params->top_k, dp.top_p = rs.params->top_p;
        dp.min_p = rs.params->min_p, dp.seed = rs.params->seed, dp.skip = 0;
      }
    }
    const size_t used = bucket ? L.bt + sizeof(int32_t) * b : L.bytes;
    AFS_CUDA_CHECK(cudaMemcpyAsync(meta_d_, meta_h_, used, cudaMemcpyHostToDevice, stream_));
    const auto t_meta = std::chrono::steady_clock::now();
    cur_ = Step{};
    cur_.T = T_, cur_.R = R, cur_.n_dec = n_dec, cur_.n_tiles = n_tiles, cur_.n_pf = n_pf;
    cur_.max_pf_pos0 = max_pf_pos0;
    const unsigned char* m = meta_d_;
    cur_.tokens = reinterpret_cast<const int32_t*>(m + L.tokens);
    cur_.pos = reinterpret_cast<const int32_t*>(m + L.pos);
    cur_.slot = reinterpret_cast<const int32_t*>(m + L.slot);
    cur_.rows = reinterpret_cast<const int32_t*>(m + L.rows);
    cur_.dec = reinterpret_cast<const int32_t*>(m + L.dec);
    cur_.bt = reinterpret_cast<const int32_t*>(m + L.bt);
    cur_.seqs = reinterpret_cast<const SeqMeta*>(m + L.seqs);
    cur_.tiles = reinterpret_cast<const int2*>(m + L.tiles);
    cur_.params = reinterpret_cast<const DeviceSamplingParams*>(m + L.params);
    cur_.st_seqs = reinterpret_cast<const SeqMeta*>(m + L.st_seqs);
    cur_.pf = reinterpret_cast<const int32_t*>(m + L.pf);
    cur_.st_bt = reinterpret_cast<const int32_t*>(m + L.st_bt);
    cur_.st_slot = nst ? reinterpret_cast<const int32_t*>(m + L.st_slot) : nullptr;

    if (bucket) {
      auto it = graphs_.find(bucket);
      if (it == graphs_.end()) {
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        AFS_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        try {
          launch_step(true);
        } catch (...) {
          // Leave the stream usable: end the broken capture before the error goes up.
          if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
          throw;
        }
        AFS_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
        const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
        cudaGraphDestroy(graph);
        AFS_CUDA_CHECK(err);
        it = graphs_.emplace(bucket, exec).first;
      }
      AFS_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
    } else {
      host_logits_ = rows ? nullptr : logits_out + size_t(host_row) * V;
      launch_step(rows != nullptr);
    }
    // Results: sampled ids, then the logits of rows the host samples itself.
    const auto t_launched = std::chrono::steady_clock::now();
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (step_times_) {
      const auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
      const auto t_done = std::chrono::steady_clock::now();
      std::fprintf(stderr, "afs step: %d tokens (%d decode)%s: metadata %.0f us, launches %.0f us, wait %.0f us\n", T_,
                   n_dec, bucket ? ", graph" : "", us(t_enter, t_meta), us(t_meta, t_launched),
                   us(t_launched, t_done));
    }
    if (rows) {
      for (int i = 0; i < R_real; ++i) {
        tokens_out[row_global_[i]] = tokens_h_[i];
        if (rows[row_global_[i]].params) continue;
        // R <= kMaxSeqs = kLogitRows when sampling: every row is still in logits_d_.
        AFS_CUDA_CHECK(cudaMemcpyAsync(logits_out + size_t(host_row++) * V, logits_d_ + size_t(i) * V,
                                       sizeof(float) * V, cudaMemcpyDeviceToHost, stream_));
      }
      AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    } else {
      host_row += R_real;
    }
  }

  // Embedding, every layer, the final norm + lm_head for the logits rows, then sampling (when
  // `sample`) or the logits rows' copy to the host (forward_batch).
  void launch_step(bool sample) {
    const int T_ = cur_.T;
    out16_ = out16_enabled_ && T_ > kOut16Rows;
    launch(embed_gather<T>, dim3(T_), dim3(kRowThreads), 0, stream_, cur_.tokens, embed_, H, x_, xa_);
    for (int l = 0; l < C::kLayers; ++l) run_layer(l, T_);
    for (int r0 = 0; r0 < cur_.R; r0 += kLogitRows) {
      const int n = std::min(kLogitRows, cur_.R - r0);
      launch(rms_norm_cast<T>, dim3(n), dim3(kRowThreads), 0, stream_, x_, cur_.rows + r0, final_norm_, H, C::kEps,
             xa_);
      linear<T>(xa_, n, H, lm_head_, V, logits_d_, V, stream_);
      if (sample) {
        launch(argmax_partial, dim3(kArgmaxParts, n), dim3(256), 0, stream_, logits_d_, V, arg_val_, arg_idx_);
        launch(sample_token, dim3(n), dim3(kSampleThreads), 0, stream_, logits_d_, V, cur_.params, arg_val_, arg_idx_,
               tokens_d_);
        AFS_CUDA_CHECK(cudaMemcpyAsync(tokens_h_, tokens_d_, sizeof(int32_t) * n, cudaMemcpyDeviceToHost, stream_));
      } else {
        AFS_CUDA_CHECK(cudaMemcpyAsync(host_logits_ + size_t(r0) * V, logits_d_, sizeof(float) * size_t(n) * V,
                                       cudaMemcpyDeviceToHost, stream_));
        AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));  // logits_d_ is reused by the next slice
      }
    }
  }

  // Upload all weights: one device copy of the data section, streamed through two pinned staging
  // buffers so the file is read once and never copied whole on the host.
  void upload_weights(const EngineFile& f) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const auto& e : f.tensors()) {
      if (e.dtype == DType::U8) continue;  // tokenizer blobs stay on the host
      lo = std::min(lo, e.offset);
      hi = std::max(hi, e.offset + e.bytes);
    }
    if (hi <= lo) throw_error(f.path(), ": engine file holds no weights");
    const uint8_t* base = f.tensors().front().data - f.tensors().front().offset;  // data section start
    weights_base_ = alloc<uint8_t>(hi);
    constexpr size_t kStage = 64ull << 20;
    uint8_t* stage[2];
    cudaEvent_t done[2];
    for (int i = 0; i < 2; ++i) {
      AFS_CUDA_CHECK(cudaMallocHost(&stage[i], kStage));
      AFS_CUDA_CHECK(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
    }
    int b = 0;
    for (uint64_t off = lo; off < hi; off += kStage, b ^= 1) {
      const size_t n = std::min<uint64_t>(kStage, hi - off);
      AFS_CUDA_CHECK(cudaEventSynchronize(done[b]));
      std::memcpy(stage[b], base + off, n);
      AFS_CUDA_CHECK(cudaMemcpyAsync(weights_base_ + off, stage[b], n, cudaMemcpyHostToDevice, stream_));
      AFS_CUDA_CHECK(cudaEventRecord(done[b], stream_));
    }
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (int i = 0; i < 2; ++i) {
      cudaFreeHost(stage[i]);
      cudaEventDestroy(done[i]);
    }
  }

  // The gate/up weights in place as interleaved (gate j, up j) row pairs: the GEMMs' SwiGLU
  // epilogue then finds both halves of an activation in one block.
  void interleave_gate_up_weights() {
    T* tmp = nullptr;
    const size_t bytes = sizeof(T) * size_t(2 * I) * H;
    const cudaError_t err = cudaMalloc(&tmp, bytes);
    if (err != cudaSuccess)
      throw_error("cannot allocate ", bytes / 1e6, " MB on the GPU to reorder the MLP weights: ",
                  cudaGetErrorString(err));
    for (Layer& L : layers_) {
      T* w = const_cast<T*>(L.gate_up);
      interleave_gate_up<T><<<2 * I, 256, 0, stream_>>>(w, tmp, I, H);
      const cudaError_t e1 = cudaGetLastError();
      const cudaError_t e2 = cudaMemcpyAsync(w, tmp, bytes, cudaMemcpyDeviceToDevice, stream_);
      if (e1 != cudaSuccess || e2 != cudaSuccess) {
        cudaFree(tmp);
        AFS_CUDA_CHECK(e1 != cudaSuccess ? e1 : e2);
      }
    }
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cudaFree(tmp);
  }

  template <class U>
  const U* dev(const TensorEntry& e) const {
    return reinterpret_cast<const U*>(weights_base_ + e.offset);
  }

  template <class U>
  U* alloc(size_t n) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(U));
    if (err != cudaSuccess)
      throw_error("cannot allocate ", n * sizeof(U) / 1e6, " MB on the GPU: ", cudaGetErrorString(err),
                  " (lower --max-context or kv_blocks, or use a GPU with more memory)");
    allocations_.push_back(p);
    return static_cast<U*>(p);
  }

  // Layer l's pools in their element type KV (T, or kv_fp8 with kv_fp8_).
  template <class KV>
  KV* kpool(int l) { return static_cast<KV*>(kpool_) + size_t(l) * layer_pool_elems_; }
  template <class KV>
  KV* vpool(int l) { return static_cast<KV*>(vpool_) + size_t(l) * layer_pool_elems_; }
  // Calls f(KV{}) with the pools' element type.
  template <class F>
  void with_kv(F&& f) {
    if (kv_fp8_) f(kv_fp8{});
    else f(T{});
  }

  static constexpr int kOut16Rows = 512;  // sm90::plan splits K only up to 512 rows
  bool out16_enabled_ = true;              // AFS_CUDA_OUT16=0 keeps float32 projection outputs
  bool out16_ = false;                     // this step's choice
  bool step_times_ = false;                // AFS_CUDA_STEP_TIMES=1: each step's host times on stderr
  StallReporter stall_;                    // a step in flight for over a minute goes to stderr
  int qkv_planes_ = 1;                     // planes the last qkv projection wrote (linear_planes)
  int fused_decode_rows_ = 0;              // see fused_qk() and AFS_CUDA_FUSED_DECODE
  bool graphs_enabled_;
  cudaStream_t stream_ = nullptr;
  std::map<int, cudaGraphExec_t> graphs_;  // decode-only steps, by batch bucket
  std::vector<void*> allocations_;
  uint8_t* weights_base_ = nullptr;
  const T* embed_ = nullptr;
  const T* lm_head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  int max_ctx_ = 0, n_splits_ = 0, bs_ = 16, bs_log2_ = 0, max_blocks_per_seq_ = 0, n_blocks_ = 0;
  size_t layer_pool_elems_ = 0, meta_bytes_ = 0;
  float2* rope_ = nullptr;
  int tile_rows_ = attn::kBr;  // query rows per prefill attention tile (sm90::kAttnRows on sm90a)
  float* arg_val_ = nullptr;
  int* arg_idx_ = nullptr;
  void *kpool_ = nullptr, *vpool_ = nullptr;  // [layers][slots][KVD] of T, or of kv_fp8 (kv_fp8_)
  bool kv_fp8_ = false;                        // kv_cache_dtype "fp8"
  int stage_blocks_ = 0;                       // fp8: blocks of the 16-bit staging pools
  T *kstage_ = nullptr, *vstage_ = nullptr;
  float *x_ = nullptr, *h_ = nullptr, *qkv_ = nullptr;
  T *xa_ = nullptr, *q_ = nullptr, *attn_ = nullptr, *act_ = nullptr;
  float *part_ml_ = nullptr, *part_acc_ = nullptr, *logits_d_ = nullptr;
  int* decode_done_ = nullptr;   // attention_decode's combine counters (zero between launches)
  bool fused_combine_ = true;    // AFS_CUDA_FUSED_COMBINE=0: attention_decode_combine instead
  unsigned char* meta_d_ = nullptr;
  unsigned char* meta_h_ = nullptr;
  int32_t* tokens_h_ = nullptr;
  int32_t* tokens_d_ = nullptr;  // sampled ids on the device
  std::vector<int> row_global_;
  float* host_logits_ = nullptr;  // forward_batch's output while a step runs
  Step cur_;
};

}  // namespace afs::cuda
