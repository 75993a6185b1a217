// The engine's nanobind module (named _afs_engine_<spec hash>, loaded by afs.load). A thin layer:
// argument conversion, the GIL released around every call into the engine, afs::Error -> afs
// EngineError (a ValueError).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include "afs/engine.h"
#include "afs/error.h"

namespace nb = nanobind;

namespace {

// One token's logprobs as Python sees them: (logprob, [(id, logprob), ...]).
using LogprobsTuple = std::tuple<float, std::vector<std::pair<int32_t, float>>>;

nb::list logprobs_list(const std::vector<afs::TokenLogprobs>& lps) {
  nb::list out;
  for (const auto& lp : lps) out.append(nb::cast(LogprobsTuple{lp.logprob, lp.top}));
  return out;
}

nb::dict result_dict(const afs::GenerateResult& r) {
  nb::dict d;
  d["tokens"] = r.tokens;
  d["finish_reason"] = r.finish_reason;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  d["logprobs"] = logprobs_list(r.logprobs);
  return d;
}

// A request from the sampling tuple of afs.Engine._sampling_args: (max_tokens, temperature, top_k,
// top_p, min_p, seed, stop_token_ids, ignore_eos, presence_penalty, frequency_penalty, logprobs,
// top_logprobs).
afs::GenerateRequest make_request(const nb::tuple& p) {
  if (nb::len(p) != 12) throw afs::Error("sampling parameters must be a tuple of 12 fields");
  afs::GenerateRequest req;
  req.max_tokens = nb::cast<int>(p[0]);
  req.sampling.temperature = nb::cast<float>(p[1]);
  req.sampling.top_k = nb::cast<int>(p[2]);
  req.sampling.top_p = nb::cast<float>(p[3]);
  req.sampling.min_p = nb::cast<float>(p[4]);
  req.sampling.seed = nb::cast<uint64_t>(p[5]);
  req.stop_ids = nb::cast<std::vector<int32_t>>(p[6]);
  req.ignore_eos = nb::cast<bool>(p[7]);
  req.sampling.presence_penalty = nb::cast<float>(p[8]);
  req.sampling.frequency_penalty = nb::cast<float>(p[9]);
  req.sampling.logprobs = nb::cast<bool>(p[10]);
  req.sampling.top_logprobs = nb::cast<int>(p[11]);
  return req;
}

nb::dict text_dict(const afs::TextResult& r) {
  nb::dict d;
  d["text"] = r.text;
  d["tokens"] = r.tokens;
  d["finish_reason"] = r.finish_reason;
  d["prompt_tokens"] = r.prompt_tokens;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  d["logprobs"] = logprobs_list(r.logprobs);
  return d;
}

// Runs one text generation on a C++ thread; Python pulls complete text pieces with next(), which
// waits with the GIL released. The generation loop itself never touches Python.
class TextStream {
 public:
  TextStream(afs::Engine& e, std::vector<int32_t> prompt, afs::GenerateRequest req, std::vector<std::string> stop) {
    worker_ = std::thread([this, &e, prompt = std::move(prompt), req = std::move(req), stop = std::move(stop)] {
      try {
        afs::TextResult r = e.generate_text(prompt, req, stop, [this](std::string_view piece) {
          std::lock_guard<std::mutex> lock(mu_);
          queue_.emplace_back(piece);
          cv_.notify_one();
          return !cancel_;
        });
        std::lock_guard<std::mutex> lock(mu_);
        result_ = std::move(r);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      cv_.notify_all();
    });
  }
  ~TextStream() {
    cancel();
    if (worker_.joinable()) {
      nb::gil_scoped_release release;
      worker_.join();
    }
  }
  // The next piece of text, or nullopt when generation has finished.
  std::optional<std::string> next() {
    // NOTE: mu_ is taken and dropped with the GIL released: holding mu_ while waiting for the GIL
    // would deadlock against a Python thread that holds the GIL and waits for the engine.
    std::optional<std::string> piece;
    std::exception_ptr error;
    {
      nb::gil_scoped_release release;
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !queue_.empty() || done_; });
      if (!queue_.empty()) {
        piece = std::move(queue_.front());
        queue_.pop_front();
      } else {
        error = error_;
      }
    }
    if (error) std::rethrow_exception(error);
    return piece;
  }
  void cancel() {
    std::lock_guard<std::mutex> lock(mu_);
    cancel_ = true;
  }
  nb::object result() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done_ || !result_) return nb::none();
    return text_dict(*result_);
  }

 private:
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  bool done_ = false, cancel_ = false;
  std::exception_ptr error_;
  std::optional<afs::TextResult> result_;
};

// One request submitted to the engine's continuous-batching scheduler. Tokens arrive from the
// worker thread into a queue; next() waits for one with the GIL released. For event loops,
// fileno() is a pipe that becomes readable when there is something to drain().
class RequestStream {
 public:
  // (token, steady-clock time in seconds, logprob or None, [(id, logprob), ...]). NOTE: libstdc++'s
  // steady_clock is CLOCK_MONOTONIC, the clock of Python's time.monotonic().
  using Item = std::tuple<int32_t, double, std::optional<float>, std::vector<std::pair<int32_t, float>>>;

  RequestStream(afs::Engine& e, const afs::GenerateRequest& req) : engine_(e) {
    state_ = std::make_shared<State>();
    auto st = state_;
    nb::gil_scoped_release release;  // submit takes the engine lock
    id_ = e.submit(
        req,
        [st](int32_t tok, const afs::TokenLogprobs* lp) {
          const double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
          std::lock_guard<std::mutex> lock(st->mu);
          st->queue.push_back(lp ? Item{tok, now, lp->logprob, lp->top} : Item{tok, now, std::nullopt, {}});
          st->cv.notify_all();
          st->wake();
          return !st->cancel;
        },
        [st](const std::vector<int32_t>& tokens, const std::string& reason) {
          std::lock_guard<std::mutex> lock(st->mu);
          st->tokens = tokens;
          st->reason = reason;
          st->done = true;
          st->cv.notify_all();
          st->wake();
        });
  }
  ~RequestStream() { cancel(); }
  std::optional<Item> next() {
    // NOTE: the state lock is taken and dropped with the GIL released (see TextStream::next).
    nb::gil_scoped_release release;
    std::unique_lock<std::mutex> lock(state_->mu);
    state_->cv.wait(lock, [this] { return !state_->queue.empty() || state_->done; });
    if (state_->queue.empty()) return std::nullopt;
    Item t = std::move(state_->queue.front());
    state_->queue.pop_front();
    return t;
  }
  int fileno() {
    nb::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->wake_read < 0) {
      int fds[2];
      if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) throw afs::Error(std::string("pipe: ") + std::strerror(errno));
      state_->wake_read = fds[0];
      state_->wake_write = fds[1];
      if (!state_->queue.empty() || state_->done) state_->wake();
    }
    return state_->wake_read;
  }
  // Everything queued so far without waiting, and whether the request has finished.
  std::pair<std::vector<Item>, bool> drain() {
    std::pair<std::vector<Item>, bool> out;
    nb::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->clear_wake();
    out.first.assign(std::make_move_iterator(state_->queue.begin()), std::make_move_iterator(state_->queue.end()));
    state_->queue.clear();
    out.second = state_->done;
    return out;
  }
  void cancel() {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->done || state_->cancel) return;
      state_->cancel = true;
    }
    nb::gil_scoped_release release;
    engine_.cancel(id_);
  }
  nb::object result() {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!state_->done) return nb::none();
    nb::dict d;
    d["tokens"] = state_->tokens;
    d["finish_reason"] = state_->reason;
    return d;
  }
  uint64_t id() const { return id_; }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Item> queue;
    std::vector<int32_t> tokens;
    std::string reason;
    bool done = false, cancel = false;
    // The wake pipe (after fileno()): holds one byte while there is something to drain.
    int wake_read = -1, wake_write = -1;
    bool wake_pending = false;
    void wake() {  // under mu
      if (wake_write < 0 || wake_pending) return;
      const char c = 1;
      wake_pending = write(wake_write, &c, 1) == 1;
    }
    void clear_wake() {  // under mu
      char buf[8];
      if (wake_pending)
        while (read(wake_read, buf, sizeof(buf)) > 0) {
        }
      wake_pending = false;
    }
    ~State() {
      if (wake_read >= 0) close(wake_read);
      if (wake_write >= 0) close(wake_write);
    }
  };
  afs::Engine& engine_;
  std::shared_ptr<State> state_;
  uint64_t id_ = 0;
};

}  // namespace

NB_MODULE(AFS_MODULE_NAME, m) {
  m.doc() = "afs engine module (model-specialised, compiled by afs-build)";
  m.attr("spec_hash") = afs::kCompiledSpecHash;
  m.attr("spec_name") = afs::kCompiledSpecName;
  static nb::exception<afs::Error> engine_error(m, "EngineError", PyExc_ValueError);

  nb::class_<TextStream>(m, "TextStream")
      .def("next", &TextStream::next)
      .def("cancel", &TextStream::cancel)
      .def("result", &TextStream::result);

  nb::class_<RequestStream>(m, "RequestStream")
      .def("next", &RequestStream::next)
      .def("fileno", &RequestStream::fileno)
      .def("drain", &RequestStream::drain)
      .def("cancel", &RequestStream::cancel)
      .def("result", &RequestStream::result)
      .def_prop_ro("id", &RequestStream::id);

  nb::class_<afs::Engine>(m, "Engine")
      .def_static(
          "load",
          [](const std::string& path, int max_context, int threads, bool cuda_graphs, int kv_blocks, int kv_block_size,
             int max_batch_tokens, float gpu_memory_fraction, const std::string& kv_cache_dtype) {
            if (max_batch_tokens < 0) throw afs::Error("max_batch_tokens must be >= 1 (0: the backend's default), got " + std::to_string(max_batch_tokens));
            afs::RuntimeOptions o;
            o.gpu_memory_fraction = gpu_memory_fraction;
            o.kv_cache_dtype = kv_cache_dtype;
            o.kv_blocks = kv_blocks;
            o.kv_block_size = kv_block_size;
            o.max_context = max_context;
            o.threads = threads;
            o.cuda_graphs = cuda_graphs;
            nb::gil_scoped_release release;
            auto e = afs::Engine::load(path, o);
            if (max_batch_tokens > 0) {
              afs::SchedulerOptions so = e->scheduler_options();
              so.max_batch_tokens = max_batch_tokens;
              e->set_scheduler_options(so);
            }
            return e;
          },
          nb::arg("path"), nb::arg("max_context") = 0, nb::arg("threads") = 0, nb::arg("cuda_graphs") = true,
          nb::arg("kv_blocks") = 0, nb::arg("kv_block_size") = 16, nb::arg("max_batch_tokens") = 0,
          nb::arg("gpu_memory_fraction") = 0.9f, nb::arg("kv_cache_dtype") = "auto")
      .def_prop_ro("vocab_size", &afs::Engine::vocab_size)
      .def_prop_ro("max_context", &afs::Engine::max_context)
      .def_prop_ro("eos_token_ids", [](const afs::Engine& e) { return e.eos_ids(); })
      .def_prop_ro("backend", [](const afs::Engine& e) { return std::string(e.backend().name()); })
      .def_prop_ro("manifest_json", [](const afs::Engine& e) { return e.file().manifest_text(); })
      .def_prop_ro("tokenizer_json",
                   [](const afs::Engine& e) {
                     std::string_view v = e.tokenizer_json();
                     return nb::bytes(v.data(), v.size());
                   })
      .def_prop_ro("has_tokenizer", [](const afs::Engine& e) { return e.tokenizer() != nullptr; })
      .def_prop_ro("has_chat_template", [](const afs::Engine& e) { return e.chat_template() != nullptr; })
      .def("encode_prompt", [](const afs::Engine& e, const std::string& text) { return e.encode_prompt(text); })
      .def("encode_chat",
           [](const afs::Engine& e, const std::vector<std::pair<std::string, std::string>>& messages, bool add_gen) {
             std::vector<afs::ChatMessage> m;
             for (const auto& [role, content] : messages) m.push_back({role, content});
             return e.encode_chat(m, add_gen);
           },
           nb::arg("messages"), nb::arg("add_generation_prompt") = true)
      .def(
          "generate_text",
          [](afs::Engine& e, const std::vector<int32_t>& ids, const nb::tuple& params, const std::vector<std::string>& stop) {
            afs::GenerateRequest req = make_request(params);
            afs::TextResult r;
            {
              nb::gil_scoped_release release;
              r = e.generate_text(ids, req, stop);
            }
            return text_dict(r);
          },
          nb::arg("token_ids"), nb::arg("params"), nb::arg("stop"))
      .def(
          "generate_batch",
          [](afs::Engine& e, const std::vector<std::vector<int32_t>>& prompts, const std::vector<nb::tuple>& params) {
            std::vector<afs::GenerateRequest> reqs(prompts.size());
            for (size_t i = 0; i < prompts.size(); ++i) {
              reqs[i] = make_request(params[i]);
              reqs[i].prompt = prompts[i];
            }
            std::vector<afs::GenerateResult> rs;
            {
              nb::gil_scoped_release release;
              rs = e.generate_batch(reqs);
            }
            nb::list out;
            for (const auto& r : rs) out.append(result_dict(r));
            return out;
          },
          nb::arg("prompts"), nb::arg("params"))
      .def(
          "submit",
          [](afs::Engine& e, const std::vector<int32_t>& ids, const nb::tuple& params) {
            afs::GenerateRequest req = make_request(params);
            req.prompt = ids;
            return new RequestStream(e, req);
          },
          nb::keep_alive<0, 1>(), nb::rv_policy::take_ownership)
      .def("scheduler_stats",
           [](afs::Engine& e) {
             afs::SchedulerStats st = e.scheduler_stats();
             nb::dict d;
             d["waiting"] = st.waiting;
             d["running"] = st.running;
             d["steps"] = st.steps;
             d["preemptions"] = st.preemptions;
             d["prompt_tokens"] = st.prompt_tokens;
             d["generated_tokens"] = st.generated_tokens;
             d["cached_prompt_tokens"] = st.cached_prompt_tokens;
             d["kv_blocks_total"] = e.kv_blocks_total();
             d["kv_blocks_free"] = e.kv_blocks_free();
             d["prefix_cache_queries"] = e.prefix_cache_queries();
             d["prefix_cache_hits"] = e.prefix_cache_hits();
             return d;
           })
      .def(
          "stream_text",
          [](afs::Engine& e, const std::vector<int32_t>& ids, const nb::tuple& params, const std::vector<std::string>& stop) {
            return new TextStream(e, ids, make_request(params), stop);
          },
          nb::keep_alive<0, 1>(), nb::rv_policy::take_ownership)
      .def(
          "score",
          [](afs::Engine& e, const std::vector<int32_t>& ids) {
            auto* out = new std::vector<float>();
            {
              nb::gil_scoped_release release;
              try {
                *out = e.score(ids);
              } catch (...) {
                delete out;
                throw;
              }
            }
            nb::capsule owner(out, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
            const size_t shape[2] = {ids.size(), static_cast<size_t>(e.vocab_size())};
            return nb::ndarray<nb::numpy, float, nb::ndim<2>>(out->data(), 2, shape, owner);
          },
          nb::arg("token_ids"), "Logits at every position: float32 array (len, vocab).")
      .def(
          "generate",
          [](afs::Engine& e, const std::vector<int32_t>& ids, const nb::tuple& params) {
            afs::GenerateRequest req = make_request(params);
            req.prompt = ids;
            afs::GenerateResult r;
            {
              nb::gil_scoped_release release;
              r = e.generate(req);
            }
            return result_dict(r);
          },
          nb::arg("token_ids"), nb::arg("params"))
      .def(
          "bench",
          [](afs::Engine& e, int prompt_tokens, int gen_tokens, int warmup) {
            afs::BenchResult b;
            {
              nb::gil_scoped_release release;
              b = e.bench(prompt_tokens, gen_tokens, warmup);
            }
            nb::dict d;
            d["prompt_tokens"] = b.prompt_tokens;
            d["gen_tokens"] = b.generated_tokens;
            d["prefill_tok_s"] = b.prefill_tok_s();
            d["decode_tok_s"] = b.decode_tok_s();
            return d;
          },
          nb::arg("prompt_tokens") = 128, nb::arg("gen_tokens") = 64, nb::arg("warmup") = 1);
}
