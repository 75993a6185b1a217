// The OLMo 2 forward pass on an NVIDIA GPU, specialised on a compile-time model config `C`
// (generated afs_config.h). Same block structure and op order as the CPU model; the layer schedule
// is generated (templates/layer_schedule_cuda.cu.j2).
//
// Data: weights are one device copy of model.afs's data section (tensor offsets unchanged), the
// residual stream is float32, GEMM inputs and the KV cache are the weight type (bf16 / fp16), GEMM
// outputs float32. The current sequence length lives on the device (len_d_) and every kernel
// reads it there, so a decode step captured once as a CUDA graph replays for any position. Only
// the sampled token id is copied back to the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "afs/backend.h"
#include "afs/engine_file.h"
#include "afs/error.h"
#include "afs/kernels/cuda/attention.cuh"
#include "afs/kernels/cuda/elementwise.cuh"
#include "afs/kernels/cuda/linear.cuh"
#include "afs/kernels/cuda/sampling.cuh"

namespace afs::cuda {

template <class C>
class Model final : public Backend {
 public:
  using W = typename C::Weight;
  using T = typename device_type<W>::type;
  static constexpr int H = C::kHidden, QD = C::kHeads * C::kHeadDim, KVD = C::kKvHeads * C::kHeadDim;
  static constexpr int QKV = QD + 2 * KVD, I = C::kIntermediate, V = C::kVocab, D = C::kHeadDim;
  static constexpr int kChunk = 2048;  // tokens per prefill chunk (bounds the scratch buffers)

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
    n_splits_ = (max_ctx_ + kDecodeSplit - 1) / kDecodeSplit;
    std::vector<float> inv_freq(D / 2);
    for (int i = 0; i < D / 2; ++i)
      inv_freq[i] = 1.0f / std::pow(static_cast<float>(C::kRopeTheta), static_cast<float>(2 * i) / D) /
                    static_cast<float>(C::kRopeFactor);
    inv_freq_ = alloc<float>(D / 2);
    AFS_CUDA_CHECK(cudaMemcpy(inv_freq_, inv_freq.data(), sizeof(float) * (D / 2), cudaMemcpyHostToDevice));
    const size_t kv = static_cast<size_t>(max_ctx_) * KVD;
    kcache_ = alloc<T>(kv * C::kLayers);
    vcache_ = alloc<T>(kv * C::kLayers);
    x_ = alloc<float>(size_t(kChunk) * H);
    h_ = alloc<float>(size_t(kChunk) * H);
    xa_ = alloc<T>(size_t(kChunk) * H);
    qkv_ = alloc<float>(size_t(kChunk) * QKV);
    q_ = alloc<T>(size_t(kChunk) * QD);
    attn_ = alloc<T>(size_t(kChunk) * QD);
    gu_ = alloc<float>(size_t(kChunk) * 2 * I);
    act_ = alloc<T>(size_t(kChunk) * I);
    tokens_d_ = alloc<int32_t>(kChunk);
    len_d_ = alloc<int>(1);
    step_d_ = alloc<unsigned long long>(1);
    params_d_ = alloc<DeviceSamplingParams>(1);
    token_out_d_ = alloc<int32_t>(1);
    part_ml_ = alloc<float>(size_t(n_splits_) * C::kHeads * 2);
    part_acc_ = alloc<float>(size_t(n_splits_) * C::kHeads * D);
    last_logits_ = alloc<float>(V);
    AFS_CUDA_CHECK(cudaMallocHost(&token_host_, sizeof(int32_t)));
    AFS_CUDA_CHECK(cudaMemset(len_d_, 0, sizeof(int)));
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  ~Model() override {
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    if (graph_) cudaGraphDestroy(graph_);
    for (void* p : allocations_) cudaFree(p);
    if (token_host_) cudaFreeHost(token_host_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  int vocab_size() const override { return V; }
  int max_context() const override { return max_ctx_; }
  int length() const override { return len_; }
  void truncate(int n) override {
    len_ = std::clamp(n, 0, len_);
    AFS_CUDA_CHECK(cudaMemcpyAsync(len_d_, &len_, sizeof(int), cudaMemcpyHostToDevice, stream_));
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    token_on_device_ = -1;
  }

  void forward(const int32_t* tokens, int n, float* logits, bool all_logits) override {
    check_tokens(tokens, n);
    if (all_logits && !all_logits_) all_logits_ = alloc<float>(size_t(kChunk) * V);
    for (int c0 = 0; c0 < n; c0 += kChunk) {
      const int Tn = std::min(kChunk, n - c0);
      const bool last = c0 + Tn == n;
      upload_tokens(tokens + c0, Tn);
      run_chunk(Tn, all_logits ? Tn : (last ? 1 : 0), all_logits ? all_logits_ : last_logits_);
      if (all_logits) {
        AFS_CUDA_CHECK(cudaMemcpyAsync(logits + size_t(c0) * V, all_logits_, sizeof(float) * size_t(Tn) * V,
                                       cudaMemcpyDeviceToHost, stream_));
      } else if (last) {
        AFS_CUDA_CHECK(cudaMemcpyAsync(logits, last_logits_, sizeof(float) * V, cudaMemcpyDeviceToHost, stream_));
      }
      AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
      len_ += Tn;
    }
    token_on_device_ = -1;
  }

  bool samples_on_device() const override { return true; }

  void begin_request(const SamplingParams& p) override {
    p.validate();
    DeviceSamplingParams d{p.temperature, p.top_k, p.top_p, p.min_p, static_cast<unsigned long long>(p.seed)};
    AFS_CUDA_CHECK(cudaMemcpyAsync(params_d_, &d, sizeof(d), cudaMemcpyHostToDevice, stream_));
    AFS_CUDA_CHECK(cudaMemsetAsync(step_d_, 0, sizeof(unsigned long long), stream_));
  }

  int32_t forward_sample(const int32_t* tokens, int n) override {
    check_tokens(tokens, n);
    if (n == 1 && graphs_enabled_) {
      if (token_on_device_ != tokens[0]) upload_tokens(tokens, 1);
      if (!graph_exec_) capture_decode_graph();
      AFS_CUDA_CHECK(cudaGraphLaunch(graph_exec_, stream_));
    } else {
      int c0 = 0;
      for (; n - c0 > kChunk; c0 += kChunk) {  // all chunks but the last: no logits
        upload_tokens(tokens + c0, kChunk);
        run_chunk(kChunk, 0, last_logits_);
        AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
        len_ += kChunk;
      }
      upload_tokens(tokens + c0, n - c0);
      run_chunk(n - c0, 1, last_logits_);
      sample_token<<<1, kSampleThreads, 0, stream_>>>(last_logits_, V, params_d_, step_d_, token_out_d_, tokens_d_);
      AFS_CUDA_CHECK(cudaGetLastError());
      n -= c0;  // the last chunk's tokens, counted below
    }
    AFS_CUDA_CHECK(cudaMemcpyAsync(token_host_, token_out_d_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    AFS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    len_ += n;
    token_on_device_ = *token_host_;
    return *token_host_;
  }

  // ---- ops called by the generated layer schedule (T tokens of this chunk) -----------------------
  void qkv_projection(int l, int Tn) { linear<T>(xa_, Tn, H, layers_[l].qkv, QKV, qkv_, QKV, stream_); }

  void qk_norm_rope_cache(int l, int Tn) {
    qk_norm_rope_kv<T, D><<<Tn, 256, 0, stream_>>>(qkv_, QD, KVD, layers_[l].q_norm, layers_[l].k_norm, inv_freq_,
                                                   C::kEps, len_d_, q_, kc(l), vc(l));
    AFS_CUDA_CHECK(cudaGetLastError());
  }

  void attention(int l, int Tn) {
    const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));
    if (Tn == 1) {
      attention_decode<T, D><<<dim3(n_splits_, C::kHeads), 128, 0, stream_>>>(q_, kc(l), vc(l), len_d_, C::kHeads,
                                                                             C::kKvHeads, scale_log2, part_ml_, part_acc_);
      attention_decode_combine<T, D><<<C::kHeads, D, 0, stream_>>>(part_ml_, part_acc_, n_splits_, attn_);
    } else {
      attention_prefill<T, D><<<dim3((Tn + attn::kBr - 1) / attn::kBr, C::kHeads), 128, 0, stream_>>>(
          q_, kc(l), vc(l), len_d_, Tn, C::kHeads, C::kKvHeads, scale_log2, attn_);
    }
    AFS_CUDA_CHECK(cudaGetLastError());
  }

  void o_proj_norm_residual(int l, int Tn) {
    linear<T>(attn_, Tn, QD, layers_[l].o_proj, H, h_, H, stream_);
    rms_norm_residual<T><<<Tn, 256, 0, stream_>>>(h_, layers_[l].post_attention_norm, H, C::kEps, x_, xa_);
    AFS_CUDA_CHECK(cudaGetLastError());
  }

  void gate_up_swiglu(int l, int Tn) {
    linear<T>(xa_, Tn, H, layers_[l].gate_up, 2 * I, gu_, 2 * I, stream_);
    swiglu<T><<<Tn, 256, 0, stream_>>>(gu_, I, act_);
    AFS_CUDA_CHECK(cudaGetLastError());
  }

  void down_proj_norm_residual(int l, int Tn) {
    linear<T>(act_, Tn, I, layers_[l].down_proj, H, h_, H, stream_);
    rms_norm_residual<T><<<Tn, 256, 0, stream_>>>(h_, layers_[l].post_feedforward_norm, H, C::kEps, x_, xa_);
    AFS_CUDA_CHECK(cudaGetLastError());
  }

 private:
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

  void run_layer(int l, int Tn);  // generated: the layer schedule

  // Embedding, every layer, then the final norm + lm_head for the last `rows` rows (0: none);
  // advances the device length by Tn.
  void run_chunk(int Tn, int rows, float* logits_d) {
    embed_gather<T><<<Tn, 256, 0, stream_>>>(tokens_d_, embed_, H, x_, xa_);
    AFS_CUDA_CHECK(cudaGetLastError());
    for (int l = 0; l < C::kLayers; ++l) run_layer(l, Tn);
    if (rows > 0) {
      rms_norm_cast<T><<<rows, 256, 0, stream_>>>(x_ + size_t(Tn - rows) * H, final_norm_, H, C::kEps, xa_);
      AFS_CUDA_CHECK(cudaGetLastError());
      linear<T>(xa_, rows, H, lm_head_, V, logits_d, V, stream_);
    }
    advance_length<<<1, 32, 0, stream_>>>(len_d_, Tn);
    AFS_CUDA_CHECK(cudaGetLastError());
  }

  void capture_decode_graph() {
    AFS_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    run_chunk(1, 1, last_logits_);
    sample_token<<<1, kSampleThreads, 0, stream_>>>(last_logits_, V, params_d_, step_d_, token_out_d_, tokens_d_);
    AFS_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph_));
    AFS_CUDA_CHECK(cudaGraphInstantiate(&graph_exec_, graph_, 0));
  }

  void check_tokens(const int32_t* tokens, int n) const {
    if (n <= 0) throw_error("forward needs at least one token");
    if (len_ + n > max_ctx_) throw_error("sequence of ", len_ + n, " tokens exceeds the context limit of ", max_ctx_);
    for (int t = 0; t < n; ++t)
      if (tokens[t] < 0 || tokens[t] >= V) throw_error("token id ", tokens[t], " is out of range [0, ", V, ")");
  }

  void upload_tokens(const int32_t* tokens, int n) {
    AFS_CUDA_CHECK(cudaMemcpyAsync(tokens_d_, tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice, stream_));
  }

  // One device copy of the data section, streamed through two pinned staging buffers so the file
  // is read once and never copied whole on the host.
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
                  " (lower --max-context, or use a GPU with more memory)");
    allocations_.push_back(p);
    return static_cast<U*>(p);
  }

  T* kc(int l) { return kcache_ + size_t(l) * max_ctx_ * KVD; }
  T* vc(int l) { return vcache_ + size_t(l) * max_ctx_ * KVD; }

  bool graphs_enabled_;
  cudaStream_t stream_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  std::vector<void*> allocations_;
  uint8_t* weights_base_ = nullptr;
  const T* embed_ = nullptr;
  const T* lm_head_ = nullptr;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  int max_ctx_ = 0, len_ = 0, n_splits_ = 0;
  int32_t token_on_device_ = -1;
  float* inv_freq_ = nullptr;
  T *kcache_ = nullptr, *vcache_ = nullptr;
  float *x_ = nullptr, *h_ = nullptr, *qkv_ = nullptr, *gu_ = nullptr;
  T *xa_ = nullptr, *q_ = nullptr, *attn_ = nullptr, *act_ = nullptr;
  int32_t* tokens_d_ = nullptr;
  int* len_d_ = nullptr;
  unsigned long long* step_d_ = nullptr;
  DeviceSamplingParams* params_d_ = nullptr;
  int32_t* token_out_d_ = nullptr;
  int32_t* token_host_ = nullptr;
  float *part_ml_ = nullptr, *part_acc_ = nullptr, *last_logits_ = nullptr, *all_logits_ = nullptr;
};

}  // namespace afs::cuda
