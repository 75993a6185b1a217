// The seam between the generic engine (generation loop, sampling, bindings, CLI) and a compiled,
// model-specialised forward pass (cpu now; cuda plugs in behind the same interface).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "afs/error.h"
#include "afs/sampler.h"

namespace afs {

class EngineFile;

struct RuntimeOptions {
  int max_context = 0;  // 0: the model's max_position_embeddings
  int threads = 0;      // CPU threads; 0: all available
  bool cuda_graphs = true;  // CUDA: replay decode steps as captured graphs
  int kv_block_size = 16;   // tokens per KV-cache block (paged backends)
  int kv_blocks = 0;  // blocks in the pool; 0: CPU enough for 4 sequences of max_context, CUDA
                      // what gpu_memory_fraction leaves after weights and buffers
  float gpu_memory_fraction = 0.9f;  // CUDA: share of the GPU's memory the engine may end up using
  // K/V cache element type: "auto" (CUDA: the weight type; CPU: float32) or "fp8" (e4m3, one byte:
  // values round to nearest even and saturate at +-448, no scale).
  std::string kv_cache_dtype = "auto";
};

// Whether options ask for the fp8 K/V cache; a clear error for any other value than "auto" / "fp8".
inline bool kv_cache_is_fp8(const RuntimeOptions& o) {
  if (o.kv_cache_dtype == "auto") return false;
  if (o.kv_cache_dtype == "fp8") return true;
  throw_error("kv_cache_dtype must be 'auto' or 'fp8', got '", o.kv_cache_dtype, "'");
}

// One sequence's part of a batched forward step (paged backends): tokens at positions
// pos0 .. pos0+n-1, whose K/V go to (and whose attention reads from) the blocks of `blocks`.
struct SeqChunk {
  const int32_t* tokens = nullptr;
  int n = 0;
  int pos0 = 0;
  const int32_t* blocks = nullptr;  // block table: position p lives in block blocks[p / block_size]
  int logits = 0;                   // 0: none, 1: the last token's row, 2: every token's row
};

// How forward_batch_sample treats one logits row (a chunk with logits == 1).
struct RowSampling {
  const SamplingParams* params = nullptr;  // nullptr: return the row's logits to the host instead
  uint64_t step = 0;  // index of the token being sampled within its request (the device RNG counter)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int vocab_size() const = 0;
  virtual int max_context() const = 0;

  // K/V live in a block pool; the engine owns the block bookkeeping (BlockPool) and the
  // scheduling, and every step runs chunks of any number of sequences.
  virtual int kv_pool_blocks() const = 0;
  virtual int kv_block_size() const = 0;
  // Runs every chunk in one step; logits receives the requested rows, chunk by chunk, in order.
  virtual void forward_batch(const SeqChunk* chunks, int n_chunks, float* logits) = 0;

  // Backends that sample on the device (CUDA) return true and offer forward_batch_sample: like
  // forward_batch, but each logits row (chunks with logits == 1 only) is sampled on the device
  // into tokens[row]. Rows whose RowSampling has no params get tokens[row] = -1 and their logits
  // copied to `logits`, packed in row order (the host samples them: features the device sampler
  // lacks). Only token ids cross to the host otherwise.
  virtual bool samples_on_device() const { return false; }
  virtual void forward_batch_sample(const SeqChunk* chunks, int n_chunks, const RowSampling* rows, int32_t* tokens,
                                    float* logits) {
    throw_error(name(), " backend does not sample on the device");
  }
};

// Defined by the generated sources of each engine build.
std::unique_ptr<Backend> make_backend(const EngineFile& file, const RuntimeOptions& options);
extern const char* const kCompiledSpecHash;
extern const char* const kCompiledSpecName;

}  // namespace afs
