// Continuous batching: decode tokens first, then chunked prefill under a token budget,
// preemption by recompute, prefix caching (see include/afs/scheduler.h).
#include "afs/scheduler.h"

#include <algorithm>

#include "afs/error.h"

namespace afs {

struct Scheduler::Request {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  // prompt + generated so far
  int generated = 0;
  int max_tokens = 0;
  SamplingParams sampling;
  Sampler sampler{0};
  std::vector<int32_t> stop_ids;
  TokenFn on_token;
  DoneFn on_done;
  std::vector<int32_t> blocks;
  std::vector<uint64_t> block_hashes;  // chained hashes of blocks [0, block_hashes.size())
  int computed = 0;                    // tokens whose K/V are in the cache
  int chunk = 0;                       // tokens scheduled in the current step
  bool cancelled = false;
  bool done = false;
  std::vector<int32_t> output() const {
    return std::vector<int32_t>(tokens.end() - generated, tokens.end());
  }
};

Scheduler::Scheduler(Backend& backend, BlockPool& pool, SchedulerOptions options)
    : backend_(backend), pool_(pool), opt_(options) {
  if (opt_.max_batch_tokens < 1) throw_error("max_batch_tokens must be >= 1, got ", opt_.max_batch_tokens);
  if (opt_.max_running < 1) throw_error("max_running must be >= 1, got ", opt_.max_running);
}

Scheduler::~Scheduler() {
  for (auto& r : running_)
    for (int32_t b : r->blocks) pool_.release(b);
  for (auto& r : waiting_)
    for (int32_t b : r->blocks) pool_.release(b);
}

uint64_t Scheduler::submit(const std::vector<int32_t>& prompt, int max_tokens, const SamplingParams& sampling,
                           std::vector<int32_t> stop_ids, TokenFn on_token, DoneFn on_done) {
  auto r = std::make_unique<Request>();
  r->id = next_id_++;
  r->tokens = prompt;
  r->max_tokens = max_tokens;
  r->sampling = sampling;
  r->sampler = Sampler(sampling.seed);
  r->stop_ids = std::move(stop_ids);
  r->on_token = std::move(on_token);
  r->on_done = std::move(on_done);
  stats_.prompt_tokens += prompt.size();
  const uint64_t id = r->id;
  waiting_.push_back(std::move(r));
  return id;
}

void Scheduler::cancel(uint64_t id) {
  for (auto& r : running_)
    if (r->id == id) r->cancelled = true;
  for (auto& r : waiting_)
    if (r->id == id) r->cancelled = true;
}

void Scheduler::abort_all(const std::string& reason) {
  for (auto& r : running_) finish(*r, reason);
  for (auto& r : waiting_) finish(*r, reason);
  running_.clear();
  waiting_.clear();
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s = stats_;
  s.waiting = static_cast<int>(waiting_.size());
  s.running = static_cast<int>(running_.size());
  return s;
}

bool Scheduler::ensure_blocks(Request& r, int tokens) {
  const int bs = pool_.block_size();
  while (static_cast<int>(r.blocks.size()) * bs < tokens) {
    const int b = pool_.allocate();
    if (b < 0) return false;
    r.blocks.push_back(b);
  }
  return true;
}

void Scheduler::publish_full_blocks(Request& r) {
  if (!opt_.prefix_caching) return;
  const int bs = pool_.block_size();
  while (static_cast<int>(r.block_hashes.size() + 1) * bs <= r.computed) {
    const size_t i = r.block_hashes.size();
    const uint64_t prev = i ? r.block_hashes[i - 1] : 0;
    const uint64_t h = BlockPool::chain_hash(prev, r.tokens.data() + i * bs, bs);
    pool_.publish(r.blocks[i], h);
    r.block_hashes.push_back(h);
  }
}

void Scheduler::admit_prefix(Request& r) {
  if (!opt_.prefix_caching || !r.blocks.empty()) return;
  const int bs = pool_.block_size();
  // Leave at least the last token to compute: its logits are needed.
  const int usable = (static_cast<int>(r.tokens.size()) - 1) / bs;
  uint64_t prev = 0;
  for (int i = 0; i < usable; ++i) {
    const uint64_t h = BlockPool::chain_hash(prev, r.tokens.data() + static_cast<size_t>(i) * bs, bs);
    const int b = pool_.lookup(h);
    if (b < 0) break;
    r.blocks.push_back(b);
    r.block_hashes.push_back(h);
    prev = h;
  }
  r.computed = static_cast<int>(r.blocks.size()) * bs;
  stats_.cached_prompt_tokens += r.computed;
}

void Scheduler::release_blocks(Request& r) {
  publish_full_blocks(r);
  for (int32_t b : r.blocks) pool_.release(b);
  r.blocks.clear();
  r.block_hashes.clear();
  r.computed = 0;
  r.chunk = 0;
}

void Scheduler::preempt(Request& r) {
  release_blocks(r);
  ++stats_.preemptions;
}

void Scheduler::finish(Request& r, const std::string& reason) {
  publish_full_blocks(r);
  for (int32_t b : r.blocks) pool_.release(b);
  r.blocks.clear();
  r.done = true;
  if (r.on_done) r.on_done(r.output(), reason);
}

bool Scheduler::step() {
  // Cancelled requests leave first, freeing their blocks.
  for (auto& r : running_)
    if (r->cancelled) finish(*r, "cancelled");
  for (auto& r : waiting_)
    if (r->cancelled) finish(*r, "cancelled");
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](auto& r) { return r->done; }), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), [](auto& r) { return r->done; }), waiting_.end());
  if (idle()) return false;

  int budget = opt_.max_batch_tokens;
  for (auto& r : running_) r->chunk = 0;
  // 1. One decode token for every running request whose prompt is done, oldest first. When the
  //    pool is dry, the newest running request is preempted (possibly this one).
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request& r = *running_[i];
    const int total = static_cast<int>(r.tokens.size());
    if (r.computed != total - 1) {
      ++i;
      continue;
    }
    bool got = ensure_blocks(r, total);
    while (!got && running_.back().get() != &r) {
      preempt(*running_.back());
      waiting_.push_front(std::move(running_.back()));
      running_.pop_back();
      got = ensure_blocks(r, total);
    }
    if (!got) {
      if (running_.size() == 1 && waiting_.empty()) {
        // Alone and still no room: the pool cannot hold this sequence at all.
        finish(r, "length");
        running_.pop_back();
        break;
      }
      preempt(r);
      waiting_.push_front(std::move(running_[i]));
      running_.erase(running_.begin() + i);
      continue;
    }
    r.chunk = 1;
    --budget;
    ++i;
  }
  // 2. Prompt chunks: running requests part-way through their prompt, then new admissions.
  for (auto& rp : running_) {
    Request& r = *rp;
    if (budget <= 0) break;
    const int left = static_cast<int>(r.tokens.size()) - r.computed;
    if (r.chunk || left == 1) continue;  // decode-ready: only the decode pass schedules it
    const int n = std::min(left, budget);
    if (!ensure_blocks(r, r.computed + n)) break;
    r.chunk = n;
    budget -= n;
  }
  while (budget > 0 && !waiting_.empty() && static_cast<int>(running_.size()) < opt_.max_running) {
    Request& r = *waiting_.front();
    admit_prefix(r);
    const int n = std::min(static_cast<int>(r.tokens.size()) - r.computed, budget);
    // Admit only while a block per running sequence stays free for their next decode tokens;
    // otherwise admissions and preemptions chase each other.
    const int bs = pool_.block_size();
    const int need = (r.computed + n + bs - 1) / bs - static_cast<int>(r.blocks.size());
    // A request that stays waiting gives back what it took here (its prefix blocks stay cached):
    // waiting requests hold no blocks, so a preempted request put back in front of it can
    // always be readmitted once the running ones finish.
    if (!running_.empty() && pool_.available() - need < static_cast<int>(running_.size())) {
      release_blocks(r);
      break;
    }
    if (!ensure_blocks(r, r.computed + n)) {
      if (running_.empty()) {
        // Nothing else holds blocks: the pool is smaller than this prompt.
        finish(r, "length");
        waiting_.pop_front();
        continue;
      }
      release_blocks(r);
      break;
    }
    r.chunk = n;
    budget -= n;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }

  // 3. One forward over every scheduled chunk.
  std::vector<SeqChunk> chunks;
  std::vector<Request*> order;
  int rows = 0;
  for (auto& rp : running_) {
    Request& r = *rp;
    if (!r.chunk) continue;
    SeqChunk c;
    c.tokens = r.tokens.data() + r.computed;
    c.n = r.chunk;
    c.pos0 = r.computed;
    c.blocks = r.blocks.data();
    c.logits = r.computed + r.chunk == static_cast<int>(r.tokens.size()) ? 1 : 0;
    rows += c.logits;
    chunks.push_back(c);
    order.push_back(&r);
  }
  if (chunks.empty()) return !idle();
  const int vocab = backend_.vocab_size();
  // Backends that sample on the device return token ids; rows that need the host sampler
  // (SamplingParams::needs_host_sampler()) come back as logits, packed.
  const bool on_device = backend_.samples_on_device();
  int host_rows = rows;
  if (on_device) {
    row_sampling_.clear();
    host_rows = 0;
    for (size_t k = 0; k < order.size(); ++k) {
      if (!chunks[k].logits) continue;
      const Request& r = *order[k];
      const bool host = r.sampling.needs_host_sampler();
      host_rows += host;
      row_sampling_.push_back(RowSampling{host ? nullptr : &r.sampling, static_cast<uint64_t>(r.generated)});
    }
    sampled_.assign(std::max(rows, 1), -1);
  }
  logits_.resize(static_cast<size_t>(std::max(host_rows, 1)) * vocab);
  if (on_device)
    backend_.forward_batch_sample(chunks.data(), static_cast<int>(chunks.size()), row_sampling_.data(),
                                  sampled_.data(), logits_.data());
  else
    backend_.forward_batch(chunks.data(), static_cast<int>(chunks.size()), logits_.data());
  ++stats_.steps;

  // 4. Sample, stream, finish.
  int row = 0, host_row = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    Request& r = *order[k];
    r.computed += r.chunk;
    if (!chunks[k].logits) {
      publish_full_blocks(r);
      continue;
    }
    int32_t tok = on_device ? sampled_[row] : -1;
    ++row;
    TokenLogprobs lp;
    if (tok < 0)
      tok = r.sampler.sample(logits_.data() + static_cast<size_t>(host_row++) * vocab, vocab, r.sampling, &lp);
    r.tokens.push_back(tok);
    ++r.generated;
    ++stats_.generated_tokens;
    publish_full_blocks(r);
    const bool keep = !r.on_token || r.on_token(tok, r.sampling.logprobs ? &lp : nullptr);
    if (!keep) {
      finish(r, "cancelled");
    } else if (std::find(r.stop_ids.begin(), r.stop_ids.end(), tok) != r.stop_ids.end()) {
      finish(r, "stop");
    } else if (r.generated >= r.max_tokens || static_cast<int>(r.tokens.size()) >= backend_.max_context()) {
      finish(r, "length");
    }
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](auto& r) { return r->done; }), running_.end());
  return true;
}

}  // namespace afs
