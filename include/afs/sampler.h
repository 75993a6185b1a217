// Token sampling on the host: greedy, temperature, top-k, top-p, min-p, presence and frequency
// penalties, with a per-request seed; log-probabilities of the chosen token and the top tokens.
#pragma once

#include <cstdint>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

namespace afs {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  uint64_t seed = 0;
  // OpenAI penalties over the tokens generated so far (not the prompt): a token's logit loses
  // presence_penalty once it has appeared and frequency_penalty for every time it has appeared.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // Report the chosen token's log-probability and the top_logprobs most likely tokens' (of the
  // model's distribution: log-softmax of the raw logits, before penalties and temperature).
  bool logprobs = false;
  int top_logprobs = 0;

  static constexpr float kMaxPenalty = 2.0f;
  static constexpr int kMaxTopLogprobs = 20;

  // Throws afs::Error naming the first invalid field.
  void validate() const;
  bool greedy() const { return temperature == 0.0f || top_k == 1; }
  bool penalized() const { return presence_penalty != 0.0f || frequency_penalty != 0.0f; }
  // Penalties and logprobs exist only in the host sampler; device samplers hand such rows back.
  bool needs_host_sampler() const { return penalized() || logprobs; }
};

// The log-probabilities reported with one sampled token (SamplingParams::logprobs).
struct TokenLogprobs {
  float logprob = 0.0f;                        // of the sampled token
  std::vector<std::pair<int32_t, float>> top;  // the most likely tokens, most likely first
};

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // Samples from one logits row. NOTE: penalties count the tokens this sampler returned, so a
  // penalized request must have every one of its tokens sampled here.
  int32_t sample(const float* logits, int vocab, const SamplingParams& p, TokenLogprobs* logprobs = nullptr);

 private:
  int32_t choose(const float* logits, int vocab, const SamplingParams& p);
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
  std::vector<float> penalized_;
  std::unordered_map<int32_t, int> counts_;  // generated token -> occurrences (penalized requests)
};

int32_t argmax(const float* logits, int vocab);

// Log-softmax of `logits` at `token` and at the `top` most likely ids (ties: lower id first); NaN
// logits count as -inf.
void compute_logprobs(const float* logits, int vocab, int32_t token, int top, TokenLogprobs& out);

}  // namespace afs
