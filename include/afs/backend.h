// The seam between the generic engine (generation loop, sampling, bindings, CLI) and a compiled,
// model-specialised forward pass (cpu now; cuda plugs in behind the same interface).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "afs/sampler.h"

namespace afs {

class EngineFile;

struct RuntimeOptions {
  int max_context = 0;  // 0: the model's max_position_embeddings
  int threads = 0;      // CPU threads; 0: all available
  bool cuda_graphs = true;  // CUDA: replay decode steps as captured graphs
  int kv_block_size = 16;   // tokens per KV-cache block (paged backends)
  int kv_blocks = 0;        // blocks in the pool; 0: enough for 4 sequences of max_context
};

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

  // Paged backends (CPU now) keep K/V in a block pool and run many sequences per step; the
  // engine owns the block bookkeeping (BlockPool) and the scheduling.
  virtual bool paged() const { return false; }
  virtual int kv_pool_blocks() const { return 0; }
  virtual int kv_block_size() const { return 0; }
  // Runs every chunk in one step; logits receives the requested rows, chunk by chunk, in order.
  virtual void forward_batch(const SeqChunk* chunks, int n_chunks, float* logits) {}
  // Backends that sample on the device (samples_on_device()) also offer this: like
  // forward_batch, but each logits row (chunks with logits == 1 only) is sampled on the device
  // into tokens[row]. Rows whose RowSampling has no params get tokens[row] = -1 and their logits
  // copied to `logits`, packed in row order (the host samples them: features the device sampler
  // lacks). Only token ids cross to the host otherwise.
  virtual void forward_batch_sample(const SeqChunk* chunks, int n_chunks, const RowSampling* rows, int32_t* tokens,
                                    float* logits) {}

  // Single-sequence backends (CUDA now) keep one contiguous KV cache.
  // Number of tokens currently in the KV cache.
  virtual int length() const { return 0; }
  // Drops the KV cache back to `n` tokens (0: a fresh sequence).
  virtual void truncate(int n) {}
  // Runs tokens[0..n) at positions length() .. length()+n-1, appending them to the KV cache.
  // logits receives [n, vocab] rows when all_logits, else the last token's [vocab] row.
  virtual void forward(const int32_t* tokens, int n, float* logits, bool all_logits) {}

  // Backends that sample on the device (CUDA) override these; the engine then never sees logits
  // during generation. begin_request sets the sampling parameters and seed of a new request;
  // forward_sample runs tokens like forward() and returns the next token.
  virtual bool samples_on_device() const { return false; }
  virtual void begin_request(const SamplingParams& p) {}
  virtual int32_t forward_sample(const int32_t* tokens, int n) { return -1; }
};

// Defined by the generated sources of each engine build.
std::unique_ptr<Backend> make_backend(const EngineFile& file, const RuntimeOptions& options);
extern const char* const kCompiledSpecHash;
extern const char* const kCompiledSpecName;

}  // namespace afs
