// Generic engine: spec check at load, scoring, the generation loop and the benchmark.
#include "afs/engine.h"

#include <algorithm>
#include <chrono>

#include "afs/error.h"
#include "afs/stop_strings.h"

namespace afs {

namespace {
double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

std::unique_ptr<Engine> Engine::load(const std::string& model_path, const RuntimeOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  e->file_ = EngineFile::open(model_path);
  const json::Value& m = e->file_->manifest();
  if (e->file_->spec_hash() != kCompiledSpecHash) {
    std::string src = "<checkpoint>";
    if (const json::Value* s = m.find("source"); s && s->is_object())
      if (const json::Value* id = s->find("model"); id && id->is_string()) src = id->as_string();
    throw_error(model_path, " was built for engine spec ", e->file_->spec_hash(), " but this engine binary was compiled for ",
                kCompiledSpecHash, " (", kCompiledSpecName, "); rebuild the engine so both match: afs-build --model ",
                src, " --output <engine dir> --force");
  }
  if (const TensorEntry* blob = e->file_->find("tokenizer.json")) {
    const json::Value* opts = m.find("tokenizer");
    if (blob->dtype != DType::U8 || !opts || !opts->is_object())
      throw_error(model_path, ": the packed tokenizer is incomplete (tensor 'tokenizer.json' or manifest 'tokenizer')");
    try {
      e->tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_json(e->tokenizer_json(), json::dump(*opts)));
      if (const json::Value* chat = m.find("chat_template"); chat && !chat->is_null())
        e->chat_ = std::make_unique<ChatTemplate>(ChatTemplate::from_json(json::dump(*chat)));
    } catch (const Error& err) {
      throw_error(model_path, ": packed tokenizer: ", err.what());
    }
  }
  e->backend_ = make_backend(*e->file_, options);
  e->pool_ = std::make_unique<BlockPool>(e->backend_->kv_pool_blocks(), e->backend_->kv_block_size());
  // Prompt tokens per step: a GPU step costs about the same up to a few thousand tokens.
  e->scheduler_options_.max_batch_tokens = e->backend_->samples_on_device() ? 2048 : 512;
  try {
    if (const json::Value* g = m.find("generation"); g && !g->is_null()) {
      if (!g->is_object()) throw_error("field 'generation' must be an object");
      if (const json::Value* eos = g->find("eos_token_ids"))
        for (const auto& v : eos->as_array("generation.eos_token_ids")) {
          const int64_t id = v.as_int("generation.eos_token_ids[]");
          if (id < 0 || id >= e->vocab_size())
            throw_error("generation.eos_token_ids holds ", id, ", not a token id of this model (vocabulary size ",
                        e->vocab_size(), ")");
          e->eos_ids_.push_back(static_cast<int32_t>(id));
        }
    }
  } catch (const Error& err) {
    throw_error(model_path, ": manifest: ", err.what());
  }
  return e;
}

void Engine::begin_sequence(Sequence& seq) { seq = Sequence(); }

void Engine::end_sequence(Sequence& seq) {
  for (int32_t b : seq.blocks) pool_->release(b);
  seq = Sequence();
}

int32_t Engine::step_sequence(Sequence& seq, const int32_t* tokens, int n, float* logits, bool all_logits,
                              const RowSampling* sample) {
  if (seq.len + n > max_context())
    throw_error("sequence of ", seq.len + n, " tokens exceeds the context limit of ", max_context());
  const int bs = pool_->block_size();
  while (static_cast<int>(seq.blocks.size()) * bs < seq.len + n) {
    const int b = pool_->allocate();
    if (b < 0)
      throw_error("the KV cache is full (", pool_->num_blocks(), " blocks of ", bs,
                  " tokens); raise kv_blocks or shorten the request");
    seq.blocks.push_back(b);
  }
  SeqChunk c;
  c.tokens = tokens;
  c.n = n;
  c.pos0 = seq.len;
  c.blocks = seq.blocks.data();
  c.logits = all_logits ? 2 : 1;
  int32_t token = -1;
  if (sample && !all_logits)
    backend_->forward_batch_sample(&c, 1, sample, &token, logits);
  else
    backend_->forward_batch(&c, 1, logits);
  seq.len += n;
  return token;
}

std::string_view Engine::tokenizer_json() const {
  const TensorEntry* blob = file_->find("tokenizer.json");
  if (!blob) return {};
  return std::string_view(reinterpret_cast<const char*>(blob->data), blob->bytes);
}

const Tokenizer& Engine::require_tokenizer() const {
  if (!tokenizer_)
    throw_error("this engine has no tokenizer (the checkpoint had no tokenizer.json); pass token ids instead");
  return *tokenizer_;
}

std::vector<int32_t> Engine::encode_prompt(std::string_view text) const {
  return require_tokenizer().encode(text, true);
}

std::vector<int32_t> Engine::encode_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  const Tokenizer& tok = require_tokenizer();
  if (!chat_) throw_error("this engine has no chat template (built with --no-chat, or the checkpoint has none)");
  if (messages.empty()) throw_error("a chat needs at least one message");
  return tok.encode(chat_->apply(messages, add_generation_prompt), false);
}

TextResult Engine::generate_text(const std::vector<int32_t>& prompt, GenerateRequest req,
                                 const std::vector<std::string>& stop,
                                 const std::function<bool(std::string_view)>& on_text) {
  const Tokenizer& tok = require_tokenizer();
  StopStrings stops(stop);
  req.prompt = prompt;
  StreamDecoder decoder(tok, /*skip_special_tokens=*/true);
  TextResult out;
  out.prompt_tokens = static_cast<int>(prompt.size());
  bool cancelled = false;
  auto emit = [&](const std::string& piece) {
    if (piece.empty()) return;
    out.text += piece;
    if (on_text && !on_text(piece)) cancelled = true;
  };
  GenerateResult g = generate(req, [&](int32_t t) {
    out.tokens.push_back(t);
    emit(stops.push(decoder.step(t)));
    return !stops.stopped() && !cancelled;
  });
  if (!stops.stopped() && !cancelled) {
    emit(stops.push(decoder.flush()));
    emit(stops.finish());
  }
  out.finish_reason = stops.stopped() ? "stop" : cancelled ? "cancelled" : g.finish_reason;
  out.logprobs = std::move(g.logprobs);
  out.prefill_seconds = g.prefill_seconds;
  out.decode_seconds = g.decode_seconds;
  return out;
}

void Engine::check_tokens(const std::vector<int32_t>& tokens, const char* what) const {
  const int v = vocab_size();
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= v)
      throw_error(what, "[", i, "] = ", tokens[i], " is not a token id of this model (vocabulary size ", v, ")");
}

std::vector<float> Engine::score(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) throw_error("score needs at least one token");
  check_tokens(tokens, "token_ids");
  if (static_cast<int>(tokens.size()) > max_context())
    throw_error("prompt of ", tokens.size(), " tokens exceeds the context limit of ", max_context());
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<float> out(tokens.size() * static_cast<size_t>(vocab_size()));
  Sequence seq;
  begin_sequence(seq);
  try {
    step_sequence(seq, tokens.data(), static_cast<int>(tokens.size()), out.data(), true);
  } catch (...) {
    end_sequence(seq);
    throw;
  }
  end_sequence(seq);
  return out;
}

void Engine::check_request(const GenerateRequest& req) const {
  if (req.prompt.empty()) throw_error("the prompt must hold at least one token");
  check_tokens(req.prompt, "prompt");
  check_tokens(req.stop_ids, "stop_token_ids");
  req.sampling.validate();
  const int ctx = max_context();
  if (static_cast<int>(req.prompt.size()) >= ctx)
    throw_error("prompt of ", req.prompt.size(), " tokens leaves no room to generate within the context limit of ", ctx);
  if (req.max_tokens < 1) throw_error("max_tokens must be >= 1, got ", req.max_tokens);
  if (req.max_tokens > ctx - static_cast<int>(req.prompt.size()))
    throw_error("max_tokens = ", req.max_tokens, " with a prompt of ", req.prompt.size(),
                " tokens exceeds the context limit of ", ctx, " tokens");
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_worker_ = true;
  }
  work_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  std::lock_guard<std::mutex> lock(mu_);
  scheduler_.reset();  // releases its blocks before the pool goes
}

uint64_t Engine::submit(const GenerateRequest& req, Scheduler::TokenFn on_token,
                        std::function<void(const std::vector<int32_t>&, const std::string&)> on_done) {
  check_request(req);
  std::unique_lock<std::mutex> lock = lock_between_steps();
  const uint64_t id = submit_locked(req, std::move(on_token), std::move(on_done));
  lock.unlock();
  work_cv_.notify_all();
  return id;
}

uint64_t Engine::submit_locked(const GenerateRequest& req, Scheduler::TokenFn on_token,
                               std::function<void(const std::vector<int32_t>&, const std::string&)> on_done) {
  std::vector<int32_t> stops = req.stop_ids;
  if (!req.ignore_eos) stops.insert(stops.end(), eos_ids_.begin(), eos_ids_.end());
  if (!scheduler_) scheduler_ = std::make_unique<Scheduler>(*backend_, *pool_, scheduler_options_);
  if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
  return scheduler_->submit(req.prompt, req.max_tokens, req.sampling, std::move(stops), std::move(on_token),
                            std::move(on_done));
}

std::unique_lock<std::mutex> Engine::lock_between_steps() {
  ++lock_waiters_;
  std::unique_lock<std::mutex> lock(mu_);
  // The worker waits after its step until no thread is waiting here any more.
  --lock_waiters_;
  work_cv_.notify_all();
  return lock;
}

void Engine::cancel(uint64_t id) {
  std::unique_lock<std::mutex> lock = lock_between_steps();
  if (scheduler_) scheduler_->cancel(id);
  work_cv_.notify_all();
}

void Engine::worker_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_worker_) {
    if (!scheduler_ || scheduler_->idle()) {
      work_cv_.wait(lock);
      continue;
    }
    try {
      scheduler_->step();
    } catch (const std::exception& e) {
      // A failed step leaves the batch undefined: end every request with the error as the reason.
      last_error_ = e.what();
      scheduler_->abort_all(std::string("error: ") + e.what());
    }
    // Let waiting submit/cancel/stats calls in before the next step (see lock_between_steps).
    work_cv_.wait(lock, [this] { return lock_waiters_.load() == 0 || stop_worker_; });
  }
}

std::vector<GenerateResult> Engine::generate_batch(const std::vector<GenerateRequest>& reqs) {
  for (const auto& r : reqs) check_request(r);
  std::vector<GenerateResult> out(reqs.size());
  std::mutex m;
  std::condition_variable cv;
  size_t done = 0;
  {
    // Every request is queued before the worker's next step: one submit at a time would let the
    // first steps start on part of the batch, and the step shapes (so the rounding) vary by timing.
    std::unique_lock<std::mutex> engine_lock = lock_between_steps();
    for (size_t i = 0; i < reqs.size(); ++i) {
      // NOTE: out[i].logprobs is written by the worker only, and read after on_done (under m).
      auto on_token = [&, i](int32_t, const TokenLogprobs* lp) {
        if (lp) out[i].logprobs.push_back(*lp);
        return true;
      };
      submit_locked(reqs[i], on_token, [&, i](const std::vector<int32_t>& tokens, const std::string& reason) {
        std::lock_guard<std::mutex> lock(m);
        out[i].tokens = tokens;
        out[i].finish_reason = reason;
        ++done;
        cv.notify_all();
      });
    }
  }
  work_cv_.notify_all();
  std::unique_lock<std::mutex> lock(m);
  cv.wait(lock, [&] { return done == reqs.size(); });
  return out;
}

SchedulerStats Engine::scheduler_stats() {
  std::unique_lock<std::mutex> lock = lock_between_steps();
  SchedulerStats s = scheduler_ ? scheduler_->stats() : SchedulerStats();
  return s;
}

GenerateResult Engine::generate(const GenerateRequest& req, const std::function<bool(int32_t)>& on_token) {
  check_request(req);
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int32_t> stops = req.stop_ids;
  if (!req.ignore_eos) stops.insert(stops.end(), eos_ids_.begin(), eos_ids_.end());
  GenerateResult r;
  // Device-sampling backends sample through forward_batch_sample; the others hand back logits,
  // and so do they for a request that uses features only the host sampler has.
  const bool host = !backend_->samples_on_device() || req.sampling.needs_host_sampler();
  RowSampling device_row{host ? nullptr : &req.sampling, 0};
  logits_.resize(vocab_size());
  Sampler sampler(req.sampling.seed);
  auto host_sample = [&] {
    TokenLogprobs lp;
    const int32_t t = sampler.sample(logits_.data(), vocab_size(), req.sampling, &lp);
    if (req.sampling.logprobs) r.logprobs.push_back(std::move(lp));
    return t;
  };
  Sequence seq;
  begin_sequence(seq);
  struct Release {
    Engine* e;
    Sequence* s;
    ~Release() { e->end_sequence(*s); }
  } release{this, &seq};
  double t0 = now_seconds();
  int32_t tok;
  tok = step_sequence(seq, req.prompt.data(), static_cast<int>(req.prompt.size()), logits_.data(), false,
                      device_row.params ? &device_row : nullptr);
  if (tok < 0) tok = host_sample();
  double t1 = now_seconds();
  r.prefill_seconds = t1 - t0;
  r.finish_reason = "length";
  for (int i = 0; i < req.max_tokens; ++i) {
    r.tokens.push_back(tok);
    if (on_token && !on_token(tok)) {
      r.finish_reason = "cancelled";
      break;
    }
    if (std::find(stops.begin(), stops.end(), tok) != stops.end()) {
      r.finish_reason = "stop";
      break;
    }
    if (i + 1 == req.max_tokens) break;
    device_row.step = static_cast<uint64_t>(i) + 1;
    tok = step_sequence(seq, &tok, 1, logits_.data(), false, device_row.params ? &device_row : nullptr);
    if (tok < 0) tok = host_sample();
  }
  r.decode_seconds = now_seconds() - t1;
  return r;
}

BenchResult Engine::bench(int prompt_tokens, int gen_tokens, int warmup) {
  if (prompt_tokens < 1 || gen_tokens < 1) throw_error("bench needs prompt and generation lengths >= 1");
  if (prompt_tokens + gen_tokens > max_context())
    throw_error("bench: ", prompt_tokens, " + ", gen_tokens, " tokens exceed the context limit of ", max_context());
  std::vector<int32_t> prompt(prompt_tokens);
  for (int i = 0; i < prompt_tokens; ++i) prompt[i] = (i * 7919 + 13) % vocab_size();  // arbitrary, non-constant ids
  GenerateRequest req;
  req.prompt = prompt;
  req.max_tokens = gen_tokens;
  req.ignore_eos = true;
  for (int w = 0; w < warmup; ++w) {
    GenerateRequest small = req;
    small.max_tokens = std::min(gen_tokens, 4);
    generate(small);
  }
  GenerateResult g = generate(req);
  BenchResult b;
  b.prompt_tokens = prompt_tokens;
  // The first generated token comes from the prefill logits; decode time covers the other steps.
  b.generated_tokens = static_cast<int>(g.tokens.size()) - 1;
  b.prefill_seconds = g.prefill_seconds;
  b.decode_seconds = g.decode_seconds;
  if (b.generated_tokens < 1) b.generated_tokens = 1;
  return b;
}

}  // namespace afs
