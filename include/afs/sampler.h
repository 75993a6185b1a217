// Token sampling on the host: greedy, temperature, top-k, top-p, min-p, with a per-request seed.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace afs {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  uint64_t seed = 0;

  // Throws afs::Error naming the first invalid field.
  void validate() const;
  bool greedy() const { return temperature == 0.0f || top_k == 1; }
};

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  int32_t sample(const float* logits, int vocab, const SamplingParams& p);

 private:
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

int32_t argmax(const float* logits, int vocab);

}  // namespace afs
