// bin/afs-engine: the standalone engine binary.
//
//   afs-engine generate (--prompt TEXT [--chat] | --token-ids 1,2,3) [--max-tokens N] [--temperature T]
//                       [--top-k K] [--top-p P] [--seed S] [--stop STR]... [--ignore-eos] [--json]
//   afs-engine chat [--system TEXT] [--messages FILE.json] [sampling options] [--json]
//   afs-engine info [--json]
//   afs-engine bench [--prompt-tokens N] [--gen-tokens N] [--warmup N] [--json]
//   afs-engine verify [--json]
// Common: --model PATH (default: ../model.afs next to this binary), --max-context N, --threads N.
// Any error prints "afs-engine: error: ..." on stderr and exits with status 1 (2 for usage errors).
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "afs/engine.h"
#include "afs/error.h"

namespace {

struct UsageError : afs::Error {
  using afs::Error::Error;
};

const char* kUsage =
    "usage: afs-engine <command> [options]\n"
    "\n"
    "commands:\n"
    "  generate   generate from a text prompt (streams text) or from token ids\n"
    "  chat       multi-turn chat with the model's chat template (interactive, or --messages FILE)\n"
    "  info       summarise the engine file and the compiled spec\n"
    "  bench      measure prefill and decode speed\n"
    "  verify     check every tensor's checksum\n"
    "\n"
    "common options:\n"
    "  --model PATH        engine file (default: ../model.afs next to this binary)\n"
    "  --max-context N     context limit in tokens (default: the model's)\n"
    "  --threads N         CPU threads (default: all)\n"
    "  --json              machine-readable output\n"
    "\n"
    "generate / chat:\n"
    "  --prompt TEXT       prompt text (generate; tokenized by the engine's tokenizer)\n"
    "  --chat              wrap --prompt as a user message in the chat template\n"
    "  --token-ids LIST    comma-separated prompt token ids instead of --prompt (output: ids)\n"
    "  --system TEXT       system message (chat)\n"
    "  --messages FILE     JSON array of {\"role\", \"content\"} to answer (chat; - for stdin)\n"
    "  --stop STR          stop string, not included in the output (repeatable)\n"
    "  --max-tokens N      tokens to generate (default 16)\n"
    "  --temperature T     0 = greedy (default 0)\n"
    "  --top-k K           0 = off (default 0)\n"
    "  --top-p P           in (0, 1] (default 1)\n"
    "  --min-p P           in [0, 1] (default 0)\n"
    "  --seed S            sampling seed (default 0)\n"
    "  --presence-penalty P   in [-2, 2]: subtracted once from each token already generated (default 0)\n"
    "  --frequency-penalty P  in [-2, 2]: subtracted per earlier occurrence of a token (default 0)\n"
    "  --ignore-eos        do not stop at the model's end-of-sequence ids\n"
    "\n"
    "bench:\n"
    "  --prompt-tokens N   prompt length (default 128)\n"
    "  --gen-tokens N      tokens to generate (default 64)\n"
    "  --warmup N          warm-up runs (default 1)\n"
    "  --concurrency N     serve N requests at once (continuous batching) and report throughput\n"
    "                      and TTFT / inter-token latency percentiles; prompt lengths vary 0.5x-1.5x\n"
    "  --requests N        requests in total with --concurrency (default 4 x concurrency)\n"
    "  --kv-blocks N       KV-cache blocks (default: CPU enough for 4 sequences of max_context;\n"
    "                      CUDA what --gpu-memory-fraction leaves after weights and buffers)\n"
    "  --kv-block-size N   tokens per KV-cache block (default 16)\n"
    "  --gpu-memory-fraction F  CUDA: share of GPU memory the engine may use (default 0.9)\n"
    "  --kv-cache-dtype T  K/V cache element type: auto (the weight type; CPU float32) or fp8\n"
    "                      (e4m3, 1 byte, no scale: more sequences fit, K/V reads halve)\n"
    "  --max-batch-tokens N  tokens per scheduler step (default CPU 512, CUDA 2048)\n";

struct Args {
  std::string command;
  std::map<std::string, std::string> opts;
  std::set<std::string> flags;
  std::vector<std::string> stops;
};

Args parse_args(int argc, char** argv) {
  static const std::set<std::string> kValued = {"--model",  "--max-context", "--threads", "--token-ids", "--max-tokens",
                                                "--temperature", "--top-k", "--top-p", "--min-p", "--seed",
                                                "--presence-penalty", "--frequency-penalty",
                                                "--prompt-tokens", "--gen-tokens", "--warmup", "--prompt",
                                                "--concurrency", "--requests", "--kv-blocks", "--max-batch-tokens",
                                                "--kv-block-size", "--gpu-memory-fraction", "--kv-cache-dtype",
                                                "--system", "--messages", "--stop"};
  static const std::set<std::string> kFlags = {"--json", "--ignore-eos", "--help", "--chat"};
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-h") s = "--help";
    if (s.rfind("--", 0) != 0) {
      if (!a.command.empty()) throw UsageError("unexpected argument '" + s + "'");
      a.command = s;
      continue;
    }
    std::string value;
    bool has_value = false;
    if (auto eq = s.find('='); eq != std::string::npos) {
      value = s.substr(eq + 1);
      s = s.substr(0, eq);
      has_value = true;
    }
    if (kFlags.count(s)) {
      if (has_value) throw UsageError("option " + s + " takes no value");
      a.flags.insert(s);
    } else if (kValued.count(s)) {
      if (!has_value) {
        if (i + 1 >= argc) throw UsageError("option " + s + " needs a value");
        value = argv[++i];
      }
      if (s == "--stop") a.stops.push_back(value);
      else a.opts[s] = value;
    } else {
      throw UsageError("unknown option '" + s + "'");
    }
  }
  return a;
}

long long parse_int(const std::string& opt, const std::string& s, long long lo, long long hi) {
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE)
    throw UsageError("option " + opt + " expects an integer, got '" + s + "'");
  if (v < lo || v > hi)
    throw UsageError("option " + opt + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + s);
  return v;
}

double parse_float(const std::string& opt, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno == ERANGE) throw UsageError("option " + opt + " expects a number, got '" + s + "'");
  return v;
}

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    ids.push_back(static_cast<int32_t>(parse_int("--token-ids", item, INT32_MIN, INT32_MAX)));
    i = j + 1;
  }
  return ids;
}

std::string default_model_path() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "model.afs";
  std::string exe(buf, n);
  std::string dir = exe.substr(0, exe.rfind('/'));
  return dir + "/../model.afs";
}

std::string json_ids(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

bool random_weights(const afs::EngineFile& f) {
  if (const auto* src = f.manifest().find("source"); src && src->is_object())
    if (const auto* r = src->find("random_weights"); r && r->is_bool()) return r->as_bool();
  return false;
}

afs::GenerateRequest request_from_args(const Args& a) {
  auto get = [&](const char* k) { return a.opts.at(k); };
  afs::GenerateRequest req;
  if (a.opts.count("--max-tokens")) req.max_tokens = static_cast<int>(parse_int("--max-tokens", get("--max-tokens"), INT_MIN, INT_MAX));
  if (a.opts.count("--temperature")) req.sampling.temperature = static_cast<float>(parse_float("--temperature", get("--temperature")));
  if (a.opts.count("--top-k")) req.sampling.top_k = static_cast<int>(parse_int("--top-k", get("--top-k"), INT_MIN, INT_MAX));
  if (a.opts.count("--top-p")) req.sampling.top_p = static_cast<float>(parse_float("--top-p", get("--top-p")));
  if (a.opts.count("--min-p")) req.sampling.min_p = static_cast<float>(parse_float("--min-p", get("--min-p")));
  if (a.opts.count("--seed")) req.sampling.seed = static_cast<uint64_t>(parse_int("--seed", get("--seed"), 0, LLONG_MAX));
  if (a.opts.count("--presence-penalty"))
    req.sampling.presence_penalty = static_cast<float>(parse_float("--presence-penalty", get("--presence-penalty")));
  if (a.opts.count("--frequency-penalty"))
    req.sampling.frequency_penalty = static_cast<float>(parse_float("--frequency-penalty", get("--frequency-penalty")));
  req.ignore_eos = a.flags.count("--ignore-eos") > 0;
  return req;
}

void note_random_weights(const afs::Engine& e) {
  if (random_weights(e.file()))
    std::fprintf(stderr, "note: this engine was built from random weights (demo model); its output is meaningless\n");
}

std::string json_text_result(const afs::TextResult& r, bool random) {
  std::string text;
  afs::json::write_string(text, r.text);
  const int decoded = static_cast<int>(r.tokens.size()) - 1;
  char buf[256];
  std::snprintf(buf, sizeof(buf), ", \"finish_reason\": \"%s\", \"random_weights\": %s, \"prefill_seconds\": %.6f, "
                "\"decode_seconds\": %.6f, \"decode_tok_s\": %.2f}", r.finish_reason.c_str(), random ? "true" : "false",
                r.prefill_seconds, r.decode_seconds, decoded > 0 ? decoded / r.decode_seconds : 0.0);
  return "{\"prompt_tokens\": " + std::to_string(r.prompt_tokens) + ", \"text\": " + text +
         ", \"tokens\": " + json_ids(r.tokens) + buf;
}

// Generates from prompt ids as text, streaming to stdout unless json.
afs::TextResult run_text(afs::Engine& e, const std::vector<int32_t>& prompt, const Args& a, bool json) {
  afs::GenerateRequest req = request_from_args(a);
  afs::TextResult r = e.generate_text(prompt, req, a.stops, [&](std::string_view piece) {
    if (!json) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  if (json) {
    std::printf("%s\n", json_text_result(r, random_weights(e.file())).c_str());
  } else {
    std::printf("\n");
    const int decoded = static_cast<int>(r.tokens.size()) - 1;
    std::fprintf(stderr, "[%zu tokens, finish: %s, prefill %.1f tok/s, decode %.1f tok/s]\n", r.tokens.size(),
                 r.finish_reason.c_str(), r.prompt_tokens / r.prefill_seconds,
                 decoded > 0 ? decoded / r.decode_seconds : 0.0);
  }
  std::fflush(stdout);
  return r;
}

int cmd_generate(afs::Engine& e, const Args& a) {
  const bool json = a.flags.count("--json") > 0;
  const bool has_ids = a.opts.count("--token-ids") > 0, has_prompt = a.opts.count("--prompt") > 0;
  if (has_ids == has_prompt) throw UsageError("generate needs exactly one of --prompt TEXT or --token-ids LIST");
  if (!json) note_random_weights(e);
  if (has_prompt) {
    const std::string& text = a.opts.at("--prompt");
    std::vector<int32_t> prompt = a.flags.count("--chat") ? e.encode_chat({{"user", text}}) : e.encode_prompt(text);
    run_text(e, prompt, a, json);
    return 0;
  }
  if (!a.stops.empty()) throw UsageError("--stop needs a text prompt (--prompt)");
  afs::GenerateRequest req = request_from_args(a);
  req.prompt = parse_ids(a.opts.at("--token-ids"));
  const bool stream = !json;
  afs::GenerateResult r = e.generate(req, [&](int32_t tok) {
    if (stream) {
      std::printf("%d ", tok);
      std::fflush(stdout);
    }
    return true;
  });
  const int decoded = static_cast<int>(r.tokens.size()) - 1;
  if (json) {
    std::printf("{\"prompt_tokens\": %zu, \"tokens\": %s, \"finish_reason\": \"%s\", \"random_weights\": %s, "
                "\"prefill_seconds\": %.6f, \"decode_seconds\": %.6f, \"decode_tok_s\": %.2f}\n",
                req.prompt.size(), json_ids(r.tokens).c_str(), r.finish_reason.c_str(),
                random_weights(e.file()) ? "true" : "false", r.prefill_seconds, r.decode_seconds,
                decoded > 0 ? decoded / r.decode_seconds : 0.0);
  } else {
    std::printf("\n");
    std::fprintf(stderr, "[%zu generated, finish: %s, prefill %.1f tok/s, decode %.1f tok/s]\n", r.tokens.size(),
                 r.finish_reason.c_str(), req.prompt.size() / r.prefill_seconds,
                 decoded > 0 ? decoded / r.decode_seconds : 0.0);
  }
  return 0;
}

std::vector<afs::ChatMessage> read_messages(const std::string& path) {
  std::string text;
  if (path == "-") {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    text = ss.str();
  } else {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw afs::Error("cannot read messages file '" + path + "'");
    std::ostringstream ss;
    ss << f.rdbuf();
    text = ss.str();
  }
  afs::json::Value v;
  try {
    v = afs::json::parse(text);
  } catch (const afs::Error& err) {
    throw afs::Error(path + ": " + err.what());
  }
  const afs::json::Value* list = &v;
  if (v.is_object()) list = &v.at("messages");
  std::vector<afs::ChatMessage> out;
  size_t i = 0;
  for (const auto& m : list->as_array((path + ": messages").c_str())) {
    const std::string where = path + ": messages[" + std::to_string(i++) + "]";
    if (!m.is_object()) throw afs::Error(where + " must be an object with 'role' and 'content'");
    const auto* role = m.find("role");
    const auto* content = m.find("content");
    if (!role || !role->is_string()) throw afs::Error(where + ".role must be a string");
    if (!content || !content->is_string()) throw afs::Error(where + ".content must be a string");
    out.push_back({role->as_string(), content->as_string()});
  }
  return out;
}

int cmd_chat(afs::Engine& e, const Args& a) {
  const bool json = a.flags.count("--json") > 0;
  std::vector<afs::ChatMessage> history;
  if (a.opts.count("--system")) history.push_back({"system", a.opts.at("--system")});
  if (a.opts.count("--messages")) {
    for (auto& m : read_messages(a.opts.at("--messages"))) history.push_back(std::move(m));
    if (!json) note_random_weights(e);
    run_text(e, e.encode_chat(history), a, json);
    return 0;
  }
  if (json) throw UsageError("chat --json needs --messages FILE (interactive chat streams text)");
  note_random_weights(e);
  std::fprintf(stderr, "afs chat: type a message and press enter; /reset clears the conversation, /exit or Ctrl-D quits\n");
  std::string line;
  for (;;) {
    std::fprintf(stderr, "> ");
    std::fflush(stderr);
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      history.erase(std::remove_if(history.begin(), history.end(), [](const auto& m) { return m.role != "system"; }),
                    history.end());
      continue;
    }
    if (line.empty()) continue;
    history.push_back({"user", line});
    try {
      afs::TextResult r = run_text(e, e.encode_chat(history), a, false);
      history.push_back({"assistant", r.text});
    } catch (const afs::Error& err) {
      history.pop_back();
      std::fprintf(stderr, "error: %s\n", err.what());
    }
  }
  return 0;
}

int cmd_info(afs::Engine& e, const Args& a) {
  const auto& f = e.file();
  const auto& m = f.manifest();
  uint64_t weight_bytes = 0;
  for (const auto& t : f.tensors()) weight_bytes += t.bytes;
  if (a.flags.count("--json")) {
    std::string tensors = "[";
    for (size_t i = 0; i < f.tensors().size(); ++i) {
      const auto& t = f.tensors()[i];
      std::string shape;
      for (size_t k = 0; k < t.shape.size(); ++k) shape += (k ? ", " : "") + std::to_string(t.shape[k]);
      tensors += std::string(i ? ", " : "") + "{\"name\": ";
      afs::json::write_string(tensors, t.name);
      tensors += ", \"dtype\": \"" + std::string(afs::dtype_name(t.dtype)) + "\", \"shape\": [" + shape +
                 "], \"bytes\": " + std::to_string(t.bytes) + "}";
    }
    tensors += "]";
    std::string spec_name;
    afs::json::write_string(spec_name, afs::kCompiledSpecName);
    std::printf("{\"spec_hash\": \"%s\", \"spec_name\": %s, \"backend\": \"%s\", \"file_bytes\": %llu, "
                "\"weight_bytes\": %llu, \"vocab_size\": %d, \"max_context\": %d, \"eos_token_ids\": %s, "
                "\"tensors\": %s}\n",
                f.spec_hash().c_str(), spec_name.c_str(), e.backend().name(), (unsigned long long)f.file_bytes(),
                (unsigned long long)weight_bytes, e.vocab_size(), e.max_context(), json_ids(e.eos_ids()).c_str(),
                tensors.c_str());
    return 0;
  }
  std::printf("engine file : %s (%.1f MB, %zu tensors)\n", f.path().c_str(), f.file_bytes() / 1e6, f.tensors().size());
  std::printf("spec        : %s (hash %s)\n", afs::kCompiledSpecName, f.spec_hash().c_str());
  std::printf("backend     : %s\n", e.backend().name());
  if (const auto* src = m.find("source"); src && src->is_object())
    if (const auto* id = src->find("model"); id && id->is_string()) std::printf("source      : %s%s\n", id->as_string().c_str(), random_weights(f) ? " (random weights)" : "");
  if (const auto* v = m.find("afs_version"); v && v->is_string()) std::printf("built by    : afs %s\n", v->as_string().c_str());
  std::printf("vocab       : %d\n", e.vocab_size());
  std::printf("context     : %d tokens\n", e.max_context());
  std::printf("eos ids     : %s\n", json_ids(e.eos_ids()).c_str());
  std::printf("weights     : %.1f MB\n", weight_bytes / 1e6);
  return 0;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  const double f = pos - i;
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

// Continuous-batching benchmark: keeps `conc` requests in flight until `total` have finished.
int bench_concurrent(afs::Engine& e, int conc, int total, int prompt, int gen, bool json) {
  using clock = std::chrono::steady_clock;
  struct Track {
    clock::time_point submitted, last;
    bool first = true;
  };
  std::vector<Track> track(total);
  std::vector<double> ttft, itl;
  std::mutex m;
  std::condition_variable cv;
  int done = 0, next = 0, failed = 0;
  long long out_tokens = 0;
  std::function<void()> submit_one;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  auto rnd = [&]() {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
  };
  // NOTE: called without m held: the callbacks take m on the engine's worker thread while it holds
  // the engine lock, so submitting (which takes the engine lock) under m would deadlock.
  submit_one = [&]() {
    int i;
    {
      std::lock_guard<std::mutex> lock(m);
      i = next++;
    }
    afs::GenerateRequest req;
    const int len = std::max(1, static_cast<int>(prompt * (0.5 + (rnd() % 1001) / 1000.0)));
    for (int k = 0; k < len; ++k) req.prompt.push_back(static_cast<int32_t>(rnd() % e.vocab_size()));
    req.max_tokens = gen;
    req.ignore_eos = true;
    track[i].submitted = clock::now();
    e.submit(
        req,
        [&, i](int32_t, const afs::TokenLogprobs*) {
          std::lock_guard<std::mutex> lock(m);
          const auto now = clock::now();
          Track& t = track[i];
          if (t.first) ttft.push_back(std::chrono::duration<double>(now - t.submitted).count());
          else itl.push_back(std::chrono::duration<double>(now - t.last).count());
          t.first = false;
          t.last = now;
          ++out_tokens;
          return true;
        },
        [&](const std::vector<int32_t>&, const std::string& reason) {
          std::lock_guard<std::mutex> lock(m);
          if (reason.rfind("error", 0) == 0) ++failed;
          ++done;
          cv.notify_all();
        });
  };
  const auto t0 = clock::now();
  for (int k = 0; k < std::min(conc, total); ++k) submit_one();
  for (;;) {
    int to_submit;
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return done >= total || (next < total && next - done < conc); });
      if (done >= total) break;
      to_submit = std::min(total - next, conc - (next - done));
    }
    for (int k = 0; k < to_submit; ++k) submit_one();
  }
  const double secs = std::chrono::duration<double>(clock::now() - t0).count();
  const afs::SchedulerStats st = e.scheduler_stats();
  if (json) {
    std::printf("{\"backend\": \"%s\", \"concurrency\": %d, \"requests\": %d, \"failed\": %d, \"seconds\": %.4f, "
                "\"output_tok_s\": %.2f, \"ttft_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}, "
                "\"itl_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}, \"preemptions\": %llu, \"steps\": %llu}\n",
                e.backend().name(), conc, total, failed, secs, out_tokens / secs, 1e3 * percentile(ttft, 0.5),
                1e3 * percentile(ttft, 0.9), 1e3 * percentile(ttft, 0.99), 1e3 * percentile(itl, 0.5),
                1e3 * percentile(itl, 0.9), 1e3 * percentile(itl, 0.99), (unsigned long long)st.preemptions,
                (unsigned long long)st.steps);
  } else {
    std::printf("requests   : %d at concurrency %d (%d failed), %.3f s\n", total, conc, failed, secs);
    std::printf("throughput : %.1f output tok/s\n", out_tokens / secs);
    std::printf("TTFT       : p50 %.2f ms, p90 %.2f ms, p99 %.2f ms\n", 1e3 * percentile(ttft, 0.5),
                1e3 * percentile(ttft, 0.9), 1e3 * percentile(ttft, 0.99));
    std::printf("inter-token: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms\n", 1e3 * percentile(itl, 0.5),
                1e3 * percentile(itl, 0.9), 1e3 * percentile(itl, 0.99));
    std::printf("scheduler  : %llu steps, %llu preemptions\n", (unsigned long long)st.steps,
                (unsigned long long)st.preemptions);
  }
  return failed ? 1 : 0;
}

int cmd_bench(afs::Engine& e, const Args& a) {
  auto geti = [&](const char* k, long long def, long long hi) {
    return a.opts.count(k) ? static_cast<int>(parse_int(k, a.opts.at(k), 0, hi)) : static_cast<int>(def);
  };
  const int p = geti("--prompt-tokens", 128, 1 << 24), g = geti("--gen-tokens", 64, 1 << 24), w = geti("--warmup", 1, 1000);
  if (a.opts.count("--concurrency")) {
    const int conc = static_cast<int>(parse_int("--concurrency", a.opts.at("--concurrency"), 1, 1 << 16));
    const int total = a.opts.count("--requests") ? static_cast<int>(parse_int("--requests", a.opts.at("--requests"), 1, 1 << 24))
                                                 : 4 * conc;
    if (p < 1 || g < 1) throw UsageError("bench needs --prompt-tokens and --gen-tokens >= 1");
    return bench_concurrent(e, conc, total, p, g, a.flags.count("--json") > 0);
  }
  afs::BenchResult b = e.bench(p, g, w);
  if (a.flags.count("--json")) {
    std::printf("{\"backend\": \"%s\", \"prompt_tokens\": %d, \"gen_tokens\": %d, \"prefill_seconds\": %.6f, "
                "\"decode_seconds\": %.6f, \"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f, \"ms_per_token\": %.4f}\n",
                e.backend().name(), b.prompt_tokens, b.generated_tokens, b.prefill_seconds, b.decode_seconds,
                b.prefill_tok_s(), b.decode_tok_s(), 1e3 / b.decode_tok_s());
  } else {
    std::printf("prefill : %d tokens in %.3f s = %.1f tok/s\n", b.prompt_tokens, b.prefill_seconds, b.prefill_tok_s());
    std::printf("decode  : %d tokens in %.3f s = %.1f tok/s (%.2f ms/token)\n", b.generated_tokens, b.decode_seconds,
                b.decode_tok_s(), 1e3 / b.decode_tok_s());
  }
  return 0;
}

int cmd_verify(afs::Engine& e, const Args& a) {
  std::vector<std::string> bad;
  e.file().verify([&](const afs::TensorEntry& t, uint32_t actual) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), " (crc32 %08x, expected %08x)", actual, t.crc32);
    bad.push_back(t.name + buf);
  });
  if (a.flags.count("--json")) {
    std::string list = "[";
    for (size_t i = 0; i < bad.size(); ++i) {
      if (i) list += ", ";
      afs::json::write_string(list, bad[i]);
    }
    std::printf("{\"ok\": %s, \"tensors\": %zu, \"bad\": %s]}\n", bad.empty() ? "true" : "false", e.file().tensors().size(), list.c_str());
  } else if (bad.empty()) {
    std::printf("ok: %zu tensors, all checksums match\n", e.file().tensors().size());
  } else {
    for (const auto& b : bad) std::fprintf(stderr, "checksum mismatch: %s\n", b.c_str());
  }
  return bad.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse_args(argc, argv);
    if (a.flags.count("--help") || a.command.empty()) {
      std::fputs(kUsage, a.command.empty() && !a.flags.count("--help") ? stderr : stdout);
      return a.flags.count("--help") ? 0 : 2;
    }
    static const std::set<std::string> kCommands = {"generate", "chat", "info", "bench", "verify"};
    if (!kCommands.count(a.command)) throw UsageError("unknown command '" + a.command + "' (generate, chat, info, bench, verify)");
    afs::RuntimeOptions ro;
    if (a.opts.count("--max-context")) ro.max_context = static_cast<int>(parse_int("--max-context", a.opts.at("--max-context"), 1, INT_MAX));
    if (a.opts.count("--threads")) ro.threads = static_cast<int>(parse_int("--threads", a.opts.at("--threads"), 1, 4096));
    if (a.opts.count("--kv-blocks")) ro.kv_blocks = static_cast<int>(parse_int("--kv-blocks", a.opts.at("--kv-blocks"), 1, INT_MAX));
    if (a.opts.count("--kv-block-size"))
      ro.kv_block_size = static_cast<int>(parse_int("--kv-block-size", a.opts.at("--kv-block-size"), 1, 1024));
    if (a.opts.count("--kv-cache-dtype")) ro.kv_cache_dtype = a.opts.at("--kv-cache-dtype");
    if (a.opts.count("--gpu-memory-fraction"))
      ro.gpu_memory_fraction = static_cast<float>(parse_float("--gpu-memory-fraction", a.opts.at("--gpu-memory-fraction")));
    const std::string model = a.opts.count("--model") ? a.opts.at("--model") : default_model_path();
    auto engine = afs::Engine::load(model, ro);
    if (a.opts.count("--max-batch-tokens")) {
      afs::SchedulerOptions so = engine->scheduler_options();
      so.max_batch_tokens = static_cast<int>(parse_int("--max-batch-tokens", a.opts.at("--max-batch-tokens"), 1, 1 << 20));
      engine->set_scheduler_options(so);
    }
    if (a.command == "generate") return cmd_generate(*engine, a);
    if (a.command == "chat") return cmd_chat(*engine, a);
    if (a.command == "info") return cmd_info(*engine, a);
    if (a.command == "bench") return cmd_bench(*engine, a);
    return cmd_verify(*engine, a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "afs-engine: error: %s\n(run afs-engine --help for usage)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "afs-engine: error: %s\n", e.what());
    return 1;
  }
}
