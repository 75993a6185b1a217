// Paged KV cache bookkeeping: a pool of fixed-size blocks (the storage lives in the backend),
// reference counts, and prefix caching.
//
// A full block is identified by a hash chained over the tokens of every block before it and its
// own tokens, so two sequences that share a prompt prefix map its full blocks to the same hashes.
// A published block whose last reference goes away is not freed at once: it stays in an LRU list
// of cached blocks and is evicted only when allocate() finds no free block.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace afs {

class BlockPool {
 public:
  BlockPool(int num_blocks, int block_size);

  int num_blocks() const { return static_cast<int>(ref_.size()); }
  int block_size() const { return block_size_; }
  // Blocks allocate() can hand out now: free ones plus cached, unreferenced ones.
  int available() const { return static_cast<int>(free_.size() + lru_.size()); }

  // A block with one reference, or -1 when none is available (evicts the least recently used
  // cached block if needed).
  int allocate();
  void retain(int block);
  void release(int block);

  // Prefix cache: the cached block holding `hash` (its reference count incremented), or -1.
  int lookup(uint64_t hash);
  // Marks a full block as holding `hash` so later sequences can share it.
  void publish(int block, uint64_t hash);

  static uint64_t chain_hash(uint64_t prev, const int32_t* tokens, int n);

  uint64_t prefix_queries() const { return queries_; }
  uint64_t prefix_hits() const { return hits_; }
  int refcount(int block) const { return ref_[block]; }

 private:
  void drop_from_lru(int block);

  int block_size_;
  std::vector<int> ref_;
  std::vector<int> free_;
  std::vector<uint64_t> hash_of_;  // 0: not published
  std::vector<bool> has_hash_;
  std::unordered_map<uint64_t, int> by_hash_;
  std::list<int> lru_;  // cached blocks with refcount 0, least recent first
  std::vector<std::list<int>::iterator> lru_pos_;
  std::vector<bool> in_lru_;
  uint64_t queries_ = 0, hits_ = 0;
};

}  // namespace afs
