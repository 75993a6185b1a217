// Host sampler. NOTE: the order of operations (penalties, temperature, top-k, top-p, min-p, then one
// uniform draw) is part of the seeded-reproducibility contract; change it only with the tests.
#include "afs/sampler.h"

#include <algorithm>
#include <cmath>

#include "afs/error.h"

namespace afs {

void SamplingParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f)
    throw_error("temperature must be a finite number >= 0, got ", temperature);
  if (top_k < 0) throw_error("top_k must be >= 0 (0 disables it), got ", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) throw_error("top_p must be in (0, 1], got ", top_p);
  if (!(min_p >= 0.0f && min_p <= 1.0f)) throw_error("min_p must be in [0, 1], got ", min_p);
  if (!(std::fabs(presence_penalty) <= kMaxPenalty))
    throw_error("presence_penalty must be in [-2, 2], got ", presence_penalty);
  if (!(std::fabs(frequency_penalty) <= kMaxPenalty))
    throw_error("frequency_penalty must be in [-2, 2], got ", frequency_penalty);
  if (top_logprobs < 0 || top_logprobs > kMaxTopLogprobs)
    throw_error("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", top_logprobs);
  if (top_logprobs > 0 && !logprobs) throw_error("top_logprobs = ", top_logprobs, " needs logprobs");
}

// NaN logits (only from weights packed with --allow-nonfinite) are never chosen; the first id wins
// when nothing else can.
int32_t argmax(const float* logits, int vocab) {
  int32_t best = 0;
  float bv = -INFINITY;
  for (int i = 0; i < vocab; ++i)
    if (logits[i] > bv) bv = logits[i], best = i;
  return best;
}

void compute_logprobs(const float* logits, int vocab, int32_t token, int top, TokenLogprobs& out) {
  auto value = [&](int i) { return std::isnan(logits[i]) ? -INFINITY : logits[i]; };
  const float mx = logits[argmax(logits, vocab)];
  double sum = 0.0;
  if (std::isfinite(mx))
    for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(value(i)) - mx);
  const double lse = mx + std::log(sum);
  // A non-finite maximum (weights packed with --allow-nonfinite): all mass on the maximum.
  auto logprob = [&](float v) {
    return std::isfinite(mx) ? static_cast<float>(v - lse) : (v == mx ? 0.0f : -INFINITY);
  };
  out.logprob = logprob(value(token));
  out.top.clear();
  top = std::min(top, vocab);
  if (top <= 0) return;
  // A heap of the best `top` so far whose front is the worst of them.
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::vector<std::pair<float, int32_t>> heap;
  heap.reserve(top);
  for (int i = 0; i < vocab; ++i) {
    const std::pair<float, int32_t> c{value(i), i};
    if (static_cast<int>(heap.size()) < top) {
      heap.push_back(c);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(c, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = c;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), better);
  for (const auto& [v, id] : heap) out.top.emplace_back(id, logprob(v));
}

int32_t Sampler::sample(const float* logits, int vocab, const SamplingParams& p, TokenLogprobs* logprobs) {
  const float* x = logits;
  if (p.penalized() && !counts_.empty()) {
    penalized_.assign(logits, logits + vocab);
    for (const auto& [tok, n] : counts_) penalized_[tok] -= p.presence_penalty + p.frequency_penalty * n;
    x = penalized_.data();
  }
  const int32_t tok = choose(x, vocab, p);
  if (p.penalized()) ++counts_[tok];
  if (logprobs && p.logprobs) compute_logprobs(logits, vocab, tok, p.top_logprobs, *logprobs);
  return tok;
}

int32_t Sampler::choose(const float* logits, int vocab, const SamplingParams& p) {
  if (p.greedy()) return argmax(logits, vocab);
  // NOTE: logits are shifted by their maximum before dividing by the temperature, so a tiny
  // temperature cannot overflow to inf - inf = NaN; NaN logits become -inf, which keeps the sort
  // below a strict weak order (std::sort with NaN keys may read out of bounds).
  const int32_t best = argmax(logits, vocab);
  const float top = logits[best];
  if (!std::isfinite(top)) return best;
  cand_.resize(vocab);
  for (int i = 0; i < vocab; ++i)
    cand_[i] = {std::isnan(logits[i]) ? -INFINITY : (logits[i] - top) / p.temperature, i};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t n = cand_.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) {
    std::partial_sort(cand_.begin(), cand_.begin() + p.top_k, cand_.end(), by_logit);
    n = p.top_k;
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  const float mx = cand_[0].first;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    cand_[i].first = std::exp(cand_[i].first - mx);
    total += cand_[i].first;
  }
  if (p.top_p < 1.0f) {
    double cum = 0.0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += cand_[i].first / total;
      if (cum >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
  }
  if (p.min_p > 0.0f) {
    // cand_[0] holds the most likely token, whose unnormalised weight is exp(0) = 1.
    size_t keep = 1;
    while (keep < n && cand_[keep].first >= p.min_p) ++keep;
    n = keep;
  }
  total = 0.0;
  for (size_t i = 0; i < n; ++i) total += cand_[i].first;
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double acc = 0.0;
  for (size_t i = 0; i < n; ++i) {
    acc += cand_[i].first;
    if (u < acc) return cand_[i].second;
  }
  return cand_[n - 1].second;
}

}  // namespace afs
