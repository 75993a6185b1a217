// The engine: one model.afs, the compiled backend for it, and the generation loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <string>
#include <vector>

#include "afs/backend.h"
#include "afs/engine_file.h"
#include "afs/kv_cache.h"
#include "afs/scheduler.h"
#include "afs/sampler.h"
#include "afs/tokenizer/chat.h"
#include "afs/tokenizer/tokenizer.h"

namespace afs {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // besides the model's EOS ids (unless ignore_eos)
  bool ignore_eos = false;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated tokens (a stop token is included, like HF)
  std::string finish_reason;    // "stop" | "length" | "cancelled"
  double prefill_seconds = 0;
  double decode_seconds = 0;
  std::vector<TokenLogprobs> logprobs;  // one per token when sampling.logprobs
};

// Text generation: the prompt as text or chat messages, user stop strings (not returned, like
// OpenAI), text streamed as complete UTF-8 pieces.
struct TextResult {
  std::string text;
  std::vector<int32_t> tokens;
  std::string finish_reason;  // "stop" | "length" | "cancelled"
  int prompt_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  std::vector<TokenLogprobs> logprobs;  // one per token when sampling.logprobs
};

struct BenchResult {
  int prompt_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  double prefill_tok_s() const { return prompt_tokens / prefill_seconds; }
  double decode_tok_s() const { return generated_tokens / decode_seconds; }
};

class Engine {
 public:
  // Opens model.afs, checks it was built for the compiled spec, creates the backend.
  static std::unique_ptr<Engine> load(const std::string& model_path, const RuntimeOptions& options);

  const EngineFile& file() const { return *file_; }
  const Backend& backend() const { return *backend_; }
  int vocab_size() const { return backend_->vocab_size(); }
  int max_context() const { return backend_->max_context(); }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  // The engine's tokenizer and compiled chat template; nullptr when model.afs has none.
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  const ChatTemplate* chat_template() const { return chat_.get(); }
  const Tokenizer& require_tokenizer() const;
  // The raw tokenizer.json packed in model.afs ("" when none).
  std::string_view tokenizer_json() const;

  // Prompt ids for text (tokenizer's add_special_tokens=true) or for chat messages (template,
  // then add_special_tokens=false, as transformers does).
  std::vector<int32_t> encode_prompt(std::string_view text) const;
  std::vector<int32_t> encode_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;
  // Generates from prompt ids, decoding as it goes; on_text receives each complete piece and
  // returns false to cancel. Stop strings end generation and are not part of the text.
  TextResult generate_text(const std::vector<int32_t>& prompt, GenerateRequest req, const std::vector<std::string>& stop,
                           const std::function<bool(std::string_view)>& on_text = {});

  // Logits at every position: [tokens.size(), vocab] row-major.
  std::vector<float> score(const std::vector<int32_t>& tokens);
  // on_token returns false to stop early (finish_reason "cancelled").
  GenerateResult generate(const GenerateRequest& req, const std::function<bool(int32_t)>& on_token = {});
  BenchResult bench(int prompt_tokens, int gen_tokens, int warmup = 1);

  // Continuous batching (paged backends): submit returns at once; on_token runs on the engine's
  // worker thread for every token (return false to cancel; its logprobs are null unless the
  // request asked for them) and on_done once at the end. Callbacks must not call back into the engine.
  uint64_t submit(const GenerateRequest& req, Scheduler::TokenFn on_token,
                  std::function<void(const std::vector<int32_t>&, const std::string&)> on_done);
  void cancel(uint64_t id);
  // Runs the requests as one continuously batched workload; results in request order. They are
  // all queued before the next step, so the steps (and their bits) do not depend on timing.
  std::vector<GenerateResult> generate_batch(const std::vector<GenerateRequest>& reqs);
  SchedulerStats scheduler_stats();
  int kv_blocks_free() const { return pool_ ? pool_->available() : 0; }
  int kv_blocks_total() const { return pool_ ? pool_->num_blocks() : 0; }
  uint64_t prefix_cache_queries() const { return pool_ ? pool_->prefix_queries() : 0; }
  uint64_t prefix_cache_hits() const { return pool_ ? pool_->prefix_hits() : 0; }
  // Applies to requests submitted after the first submit only if set before it.
  void set_scheduler_options(const SchedulerOptions& o) { scheduler_options_ = o; }
  const SchedulerOptions& scheduler_options() const { return scheduler_options_; }
  ~Engine();

  // Validates a request (ids, sampling, lengths) without running it.
  void check_request(const GenerateRequest& req) const;
  // Throws afs::Error when any token id is outside [0, vocab).
  void check_tokens(const std::vector<int32_t>& tokens, const char* what) const;

 private:
  Engine() = default;
  // One sequence's KV state: its blocks of the pool.
  struct Sequence {
    std::vector<int32_t> blocks;
    int len = 0;
  };
  void begin_sequence(Sequence& seq);
  void end_sequence(Sequence& seq);
  // Runs tokens through the sequence's KV state. With `sample` (device-sampling backends)
  // the next token is sampled on the device and returned; otherwise logits are filled and -1 returned.
  int32_t step_sequence(Sequence& seq, const int32_t* tokens, int n, float* logits, bool all_logits,
                        const RowSampling* sample = nullptr);

  std::unique_ptr<EngineFile> file_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<BlockPool> pool_;
  std::unique_ptr<Scheduler> scheduler_;
  SchedulerOptions scheduler_options_;
  std::thread worker_;
  std::condition_variable work_cv_;
  bool stop_worker_ = false;
  std::string last_error_;
  void worker_loop();
  std::vector<int32_t> eos_ids_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ChatTemplate> chat_;
  std::vector<float> logits_;
  std::mutex mu_;  // one sequence at a time
  // Threads waiting for mu_ in submit, cancel and scheduler_stats; the worker, which holds mu_
  // while requests run, lets them in between steps (std::mutex is not fair).
  std::atomic<int> lock_waiters_{0};
  std::unique_lock<std::mutex> lock_between_steps();
  // submit's work under mu_ (held by the caller), the request already checked.
  uint64_t submit_locked(const GenerateRequest& req, Scheduler::TokenFn on_token,
                         std::function<void(const std::vector<int32_t>&, const std::string&)> on_done);
};

}  // namespace afs
