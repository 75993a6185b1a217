// Continuous batching over a paged backend.
//
// Every step() builds one batch: first a decode token for each running request, then prompt
// chunks (new requests are admitted in arrival order) until the step's token budget is used. When
// the pool runs out of blocks for a decode token, the most recently admitted request is preempted
// by recompute: its blocks are released and it waits again with prompt + generated tokens as its
// new prompt; its output continues where it stopped. Full blocks are published to the prefix
// cache, so a request whose prompt starts with cached blocks skips computing them.
//
// Not thread-safe by itself: the engine serialises submit/cancel/step under its own lock.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "afs/backend.h"
#include "afs/kv_cache.h"
#include "afs/sampler.h"

namespace afs {

struct SchedulerOptions {
  int max_batch_tokens = 512;  // tokens per step (decode tokens + prompt chunks)
  int max_running = 256;       // sequences per step
  bool prefix_caching = true;
};

struct SchedulerStats {
  int waiting = 0, running = 0;
  uint64_t steps = 0, preemptions = 0, prompt_tokens = 0, generated_tokens = 0, cached_prompt_tokens = 0;
};

class Scheduler {
 public:
  // on_token(token, logprobs) returns false to cancel; logprobs is null unless the request asked
  // for them. on_done(tokens, finish_reason) is called exactly once.
  using TokenFn = std::function<bool(int32_t, const TokenLogprobs*)>;
  using DoneFn = std::function<void(const std::vector<int32_t>&, const std::string&)>;

  Scheduler(Backend& backend, BlockPool& pool, SchedulerOptions options);
  ~Scheduler();

  // Validated by the caller (Engine::check_request); stop_ids include the EOS ids unless the
  // request ignores them. Returns the request id.
  uint64_t submit(const std::vector<int32_t>& prompt, int max_tokens, const SamplingParams& sampling,
                  std::vector<int32_t> stop_ids, TokenFn on_token, DoneFn on_done);
  void cancel(uint64_t id);
  // Ends every request at once with `reason` (after a failed step).
  void abort_all(const std::string& reason);
  // Runs one batch step; returns false when there was nothing to do.
  bool step();
  bool idle() const { return waiting_.empty() && running_.empty(); }
  SchedulerStats stats() const;

 private:
  struct Request;
  bool schedule_decode(Request& r);
  // Publishes r's full blocks and releases all of them; r recomputes from its prefix-cache hits.
  void release_blocks(Request& r);
  void preempt(Request& r);
  void admit_prefix(Request& r);
  void publish_full_blocks(Request& r);
  void finish(Request& r, const std::string& reason);
  bool ensure_blocks(Request& r, int tokens);

  Backend& backend_;
  BlockPool& pool_;
  SchedulerOptions opt_;
  uint64_t next_id_ = 1;
  std::deque<std::unique_ptr<Request>> waiting_;
  std::vector<std::unique_ptr<Request>> running_;  // in admission order
  std::vector<float> logits_;
  std::vector<RowSampling> row_sampling_;
  std::vector<int32_t> sampled_;
  SchedulerStats stats_;
};

}  // namespace afs
