// Block pool with reference counts and an LRU prefix cache (see include/afs/kv_cache.h).
#include "afs/kv_cache.h"

#include <iterator>

#include "afs/error.h"

namespace afs {

BlockPool::BlockPool(int num_blocks, int block_size)
    : block_size_(block_size),
      ref_(num_blocks, 0),
      hash_of_(num_blocks, 0),
      has_hash_(num_blocks, false),
      lru_pos_(num_blocks),
      in_lru_(num_blocks, false) {
  if (num_blocks < 1) throw_error("the KV cache needs at least one block, got ", num_blocks);
  if (block_size < 1) throw_error("kv block size must be >= 1, got ", block_size);
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // hand out low ids first
}

void BlockPool::drop_from_lru(int block) {
  if (in_lru_[block]) {
    lru_.erase(lru_pos_[block]);
    in_lru_[block] = false;
  }
}

int BlockPool::allocate() {
  int b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    drop_from_lru(b);
    by_hash_.erase(hash_of_[b]);
    has_hash_[b] = false;
  } else {
    return -1;
  }
  ref_[b] = 1;
  return b;
}

void BlockPool::retain(int block) {
  if (ref_[block] == 0) drop_from_lru(block);
  ++ref_[block];
}

void BlockPool::release(int block) {
  if (ref_[block] <= 0) throw_error("KV block ", block, " released more often than retained");
  if (--ref_[block] > 0) return;
  if (has_hash_[block]) {
    lru_.push_back(block);
    lru_pos_[block] = std::prev(lru_.end());
    in_lru_[block] = true;
  } else {
    free_.push_back(block);
  }
}

int BlockPool::lookup(uint64_t hash) {
  ++queries_;
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  ++hits_;
  retain(it->second);
  return it->second;
}

void BlockPool::publish(int block, uint64_t hash) {
  if (has_hash_[block] || by_hash_.count(hash)) return;  // already cached (maybe in another block)
  hash_of_[block] = hash;
  has_hash_[block] = true;
  by_hash_[hash] = block;
}

uint64_t BlockPool::chain_hash(uint64_t prev, const int32_t* tokens, int n) {
  // FNV-1a over the previous hash and the tokens, finished with a 64-bit mix.
  uint64_t h = 1469598103934665603ull ^ prev;
  auto mix = [&](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  for (int i = 0; i < n; ++i) mix(static_cast<uint32_t>(tokens[i]));
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h == 0 ? 1 : h;
}

}  // namespace afs
