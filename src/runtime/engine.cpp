// Generic engine: spec check at load, scoring, the generation loop and the benchmark.
#include "afs/engine.h"

#include <algorithm>
#include <chrono>

#include "afs/error.h"

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
    if (const json::Value* s = m.find("source"))
      if (const json::Value* id = s->find("model"); id && id->is_string()) src = id->as_string();
    throw_error(model_path, " was built for engine spec ", e->file_->spec_hash(), " but this engine binary was compiled for ",
                kCompiledSpecHash, " (", kCompiledSpecName, "); rebuild the engine so both match: afs-build --model ",
                src, " --output <engine dir> --force");
  }
  if (const json::Value* g = m.find("generation")) {
    if (const json::Value* eos = g->find("eos_token_ids"))
      for (const auto& v : eos->as_array("generation.eos_token_ids"))
        e->eos_ids_.push_back(static_cast<int32_t>(v.as_int("eos token id")));
  }
  e->backend_ = make_backend(*e->file_, options);
  return e;
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
  backend_->truncate(0);
  backend_->forward(tokens.data(), static_cast<int>(tokens.size()), out.data(), true);
  return out;
}

GenerateResult Engine::generate(const GenerateRequest& req, const std::function<bool(int32_t)>& on_token) {
  if (req.prompt.empty()) throw_error("the prompt must hold at least one token");
  check_tokens(req.prompt, "prompt");
  check_tokens(req.stop_ids, "stop_ids");
  req.sampling.validate();
  const int ctx = max_context();
  if (static_cast<int>(req.prompt.size()) >= ctx)
    throw_error("prompt of ", req.prompt.size(), " tokens leaves no room to generate within the context limit of ", ctx);
  if (req.max_tokens < 1) throw_error("max_tokens must be >= 1, got ", req.max_tokens);
  if (req.max_tokens > ctx - static_cast<int>(req.prompt.size()))
    throw_error("max_tokens = ", req.max_tokens, " with a prompt of ", req.prompt.size(),
                " tokens exceeds the context limit of ", ctx, " tokens");

  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int32_t> stops = req.stop_ids;
  if (!req.ignore_eos) stops.insert(stops.end(), eos_ids_.begin(), eos_ids_.end());
  GenerateResult r;
  const bool on_device = backend_->samples_on_device();
  if (!on_device) logits_.resize(vocab_size());
  Sampler sampler(req.sampling.seed);
  backend_->truncate(0);
  double t0 = now_seconds();
  int32_t tok;
  if (on_device) {
    backend_->begin_request(req.sampling);
    tok = backend_->forward_sample(req.prompt.data(), static_cast<int>(req.prompt.size()));
  } else {
    backend_->forward(req.prompt.data(), static_cast<int>(req.prompt.size()), logits_.data(), false);
    tok = sampler.sample(logits_.data(), vocab_size(), req.sampling);
  }
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
    if (on_device) {
      tok = backend_->forward_sample(&tok, 1);
    } else {
      backend_->forward(&tok, 1, logits_.data(), false);
      tok = sampler.sample(logits_.data(), vocab_size(), req.sampling);
    }
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
