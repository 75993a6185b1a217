// Byte-level BPE tokenizer: tokenizer.json loading, encode, decode. See afs/tokenizer/tokenizer.h.
//
// Encode follows HF tokenizers step by step:
//   1. added tokens are cut out of the text (leftmost-longest, non-normalized tokens on the whole text
//      first, then normalized ones on each remaining piece), honouring lstrip/rstrip/single_word;
//   2. each remaining piece is split by the pre-tokenizer regex(es) into words;
//   3. each word's bytes become byte-level symbols that BPE merges, lowest merge rank first and
//      leftmost first among equal ranks (HF's priority queue order);
//   4. the post-processor (or the add_bos/add_eos override) adds special tokens.
#include "afs/tokenizer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "afs/error.h"
#include "afs/json.h"
#include "afs/tokenizer/pretokenizer.h"

namespace afs {

using tokenizer::SplitPattern;

namespace {

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
struct ByteLevelTables {
  uint32_t byte_to_char[256];
  int16_t char_to_byte[512];  // indexed by code point < 512; -1 if not a byte-level character
  ByteLevelTables() {
    std::fill(std::begin(char_to_byte), std::end(char_to_byte), int16_t(-1));
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_char[b] = printable ? b : next++;
      char_to_byte[byte_to_char[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelTables& byte_level() {
  static const ByteLevelTables t;
  return t;
}

// Byte-level string (as stored in vocab/merges) -> raw bytes. False if a character is not one of
// the 256 byte-level characters (then the ByteLevel decoder emits the token's UTF-8 as is).
bool byte_level_to_bytes(std::string_view token, std::string* out) {
  out->clear();
  const auto* s = reinterpret_cast<const unsigned char*>(token.data());
  for (size_t i = 0; i < token.size();) {
    size_t len;
    const uint32_t cp = tokenizer::decode_utf8(s, i, &len);
    if (cp >= 512 || byte_level().char_to_byte[cp] < 0) return false;
    out->push_back(static_cast<char>(byte_level().char_to_byte[cp]));
    i += len;
  }
  return true;
}

// Open-addressing map from a (left id, right id) pair to (rank, merged id).
class MergeMap {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, 0);
    mask_ = cap - 1;
  }
  // Later merges of the same pair overwrite earlier ones, as HF's HashMap collect does.
  void insert(int32_t a, int32_t b, uint32_t rank, int32_t merged) {
    const uint64_t key = pack(a, b);
    size_t i = hash(key) & mask_;
    while (keys_[i] != kEmpty && keys_[i] != key) i = (i + 1) & mask_;
    keys_[i] = key;
    values_[i] = (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(merged);
  }
  // Returns false if the pair has no merge.
  bool find(int32_t a, int32_t b, uint32_t* rank, int32_t* merged) const {
    const uint64_t key = pack(a, b);
    size_t i = hash(key) & mask_;
    for (;;) {
      const uint64_t k = keys_[i];
      if (k == key) {
        *rank = static_cast<uint32_t>(values_[i] >> 32);
        *merged = static_cast<int32_t>(static_cast<uint32_t>(values_[i]));
        return true;
      }
      if (k == kEmpty) return false;
      i = (i + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static uint64_t pack(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  static size_t hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<size_t>(k);
  }
  std::vector<uint64_t> keys_;
  std::vector<uint64_t> values_;
  size_t mask_ = 0;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, single_word, normalized;
};

// Leftmost-longest matcher over a small set of literal byte strings (the added tokens).
class LiteralSet {
 public:
  void build(const std::vector<const AddedToken*>& tokens) {
    nodes_.assign(1, Node{});
    std::fill(std::begin(first_), std::end(first_), false);
    for (const AddedToken* t : tokens) {
      int node = 0;
      for (unsigned char c : t->content) {
        int child = nodes_[node].child(c);
        if (child < 0) {
          child = static_cast<int>(nodes_.size());
          nodes_[node].children.emplace_back(c, child);
          nodes_.push_back(Node{});
        }
        node = child;
      }
      nodes_[node].token = t;
      first_[static_cast<unsigned char>(t->content[0])] = true;
    }
    empty_ = tokens.empty();
  }
  bool empty() const { return empty_; }
  // Longest token starting at s[i], or nullptr.
  const AddedToken* longest_at(std::string_view s, size_t i, size_t* len) const {
    if (!first_[static_cast<unsigned char>(s[i])]) return nullptr;
    const AddedToken* best = nullptr;
    int node = 0;
    for (size_t j = i; j < s.size(); ++j) {
      node = nodes_[node].child(static_cast<unsigned char>(s[j]));
      if (node < 0) break;
      if (nodes_[node].token) {
        best = nodes_[node].token;
        *len = j + 1 - i;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int>> children;
    const AddedToken* token = nullptr;
    int child(unsigned char c) const {
      for (const auto& kv : children)
        if (kv.first == c) return kv.second;
      return -1;
    }
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
  bool empty_ = true;
};

// Per-thread, direct-mapped cache of BPE results for short words, keyed by the owning tokenizer's
// serial number (never reused, so a destroyed tokenizer's cache is never read by a new one).
struct WordCache {
  static constexpr size_t kEntries = 1 << 14;
  static constexpr size_t kMaxBytes = 22;
  static constexpr size_t kMaxIds = 8;
  struct Entry {
    uint64_t hash = 0;
    uint8_t len = 0xFF;
    uint8_t nids = 0;
    char bytes[kMaxBytes];
    int32_t ids[kMaxIds];
  };
  uint64_t owner = 0;
  std::vector<Entry> entries;
};
std::atomic<uint64_t> g_tokenizer_serial{1};

inline uint64_t hash_bytes(const unsigned char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0xff51afd7ed558ccdULL);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001B3ULL;
    h ^= h >> 29;
  }
  uint64_t w = 0;
  std::memcpy(&w, p + i, n - i);
  h = (h ^ w) * 0xC2B2AE3D27D4EB4FULL;
  h ^= h >> 32;
  return h;
}

// Ids index dense tables; 16M is far above any real vocabulary and keeps a hostile file's tables small.
constexpr int64_t kMaxTokenId = int64_t(1) << 24;

[[noreturn]] void unsupported(const std::string& field, const std::string& value) {
  throw_error("tokenizer.json: unsupported ", field, " ", value,
              " (afs supports byte-level BPE tokenizers of the OLMo 2 / Llama 3 / GPT-2 kind)");
}

std::string type_of(const json::Value& v, const std::string& field) {
  if (!v.is_object()) throw_error("tokenizer.json: ", field, " must be an object or null");
  const json::Value* t = v.find("type");
  if (!t || !t->is_string()) throw_error("tokenizer.json: ", field, " has no \"type\"");
  return t->as_string();
}

bool get_bool(const json::Value& obj, std::string_view key, bool dflt, const std::string& where) {
  const json::Value* v = obj.find(key);
  if (!v || v->is_null()) return dflt;
  if (!v->is_bool()) throw_error("tokenizer.json: ", where, ".", key, " must be a boolean");
  return v->as_bool();
}

}  // namespace

// ------------------------------------------------------------------------------------ options

TokenizerOptions TokenizerOptions::from_json(std::string_view text) {
  TokenizerOptions o;
  if (text.empty()) return o;
  const json::Value v = json::parse(text);
  if (!v.is_object()) throw_error("tokenizer options must be a JSON object");
  auto get_id = [&](const char* key, int32_t* out) {
    const json::Value* x = v.find(key);
    if (!x || x->is_null()) return;
    if (!x->is_int() || x->as_int() < 0 || x->as_int() > INT32_MAX)
      throw_error("tokenizer options: ", key, " must be a non-negative integer or null");
    *out = static_cast<int32_t>(x->as_int());
  };
  auto get_flag = [&](const char* key, std::optional<bool>* out) {
    const json::Value* x = v.find(key);
    if (!x || x->is_null()) return;
    if (!x->is_bool()) throw_error("tokenizer options: ", key, " must be a boolean or null");
    *out = x->as_bool();
  };
  get_id("bos_token_id", &o.bos_token_id);
  get_id("eos_token_id", &o.eos_token_id);
  get_id("pad_token_id", &o.pad_token_id);
  get_flag("add_bos_token", &o.add_bos_token);
  get_flag("add_eos_token", &o.add_eos_token);
  if (const json::Value* ids = v.find("eos_token_ids"); ids && !ids->is_null()) {
    for (const json::Value& x : ids->as_array("tokenizer options: eos_token_ids")) {
      if (!x.is_int() || x.as_int() < 0 || x.as_int() > INT32_MAX)
        throw_error("tokenizer options: eos_token_ids must hold non-negative integers");
      o.eos_token_ids.push_back(static_cast<int32_t>(x.as_int()));
    }
  }
  return o;
}

std::string TokenizerOptions::to_json() const {
  std::ostringstream os;
  auto id = [](int32_t v) { return v < 0 ? std::string("null") : std::to_string(v); };
  auto flag = [](const std::optional<bool>& f) { return !f ? "null" : (*f ? "true" : "false"); };
  os << "{\"bos_token_id\": " << id(bos_token_id) << ", \"eos_token_id\": " << id(eos_token_id)
     << ", \"pad_token_id\": " << id(pad_token_id) << ", \"eos_token_ids\": [";
  for (size_t i = 0; i < eos_token_ids.size(); ++i) os << (i ? ", " : "") << eos_token_ids[i];
  os << "], \"add_bos_token\": " << flag(add_bos_token) << ", \"add_eos_token\": " << flag(add_eos_token) << "}";
  return os.str();
}

// ------------------------------------------------------------------------------------ impl

struct Tokenizer::Impl {
  TokenizerOptions options;
  uint64_t serial = 0;

  // model
  std::unordered_map<std::string, int32_t> vocab;         // byte-level token string -> id
  std::unordered_map<std::string, int32_t> vocab_bytes;   // raw bytes -> id (ignore_merges)
  std::vector<std::string> vocab_r;                        // id -> model token string
  std::vector<bool> vocab_has;
  MergeMap merges;
  int32_t byte_id[256];  // id of each single byte's symbol, -1 if absent from the vocab
  bool ignore_merges = false;
  int32_t unk_id = -1;
  bool fuse_unk = false;

  // added tokens
  std::vector<AddedToken> added;  // in tokenizer.json order
  std::unordered_map<std::string, int32_t> added_by_content;
  std::unordered_map<int32_t, size_t> added_by_id;  // id -> index in `added`
  std::unordered_set<std::string> special_contents;
  LiteralSet raw_set, normalized_set;

  // pre-tokenizer: the regex stages applied in order to each piece
  std::vector<SplitPattern> stages;

  // post-processor: ids before and after the sequence
  std::vector<int32_t> prefix_ids, suffix_ids;

  // decoding: per id, the bytes it decodes to and whether it is special
  std::vector<uint32_t> dec_offset;  // size id_space + 1
  std::string dec_bytes;
  std::vector<uint8_t> dec_flags;  // bit0 known, bit1 special
  size_t vocab_size_with_added = 0;

  void load(const json::Value& root);
  void load_model(const json::Value& model);
  void load_added(const json::Value& list);
  void load_pre_tokenizer(const json::Value& pt);
  void load_post_processor(const json::Value& pp, std::vector<int32_t>* pre, std::vector<int32_t>* post);
  void build_decoder();

  int32_t token_to_id(std::string_view s) const {
    auto it = added_by_content.find(std::string(s));
    if (it != added_by_content.end()) return it->second;
    auto jt = vocab.find(std::string(s));
    return jt == vocab.end() ? -1 : jt->second;
  }
  const std::string* id_to_token(int32_t id) const {
    auto it = added_by_id.find(id);
    if (it != added_by_id.end()) return &added[it->second].content;
    if (id >= 0 && static_cast<size_t>(id) < vocab_r.size() && vocab_has[id]) return &vocab_r[id];
    return nullptr;
  }

  struct Piece {
    uint32_t begin, end;
    int32_t id;  // added token id, or -1 for text to pre-tokenize
  };
  void find_added(std::string_view text, uint32_t base, const LiteralSet& set, std::vector<Piece>& out) const;
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;
  // Calls f(begin, end) for each word the pre-tokenizer stages cut `piece` into.
  template <class F>
  void for_each_word(std::string_view piece, F&& f) const {
    thread_local std::vector<uint32_t> ends;
    ends.clear();
    tokenizer::split_pretokens(stages[0], piece, ends);
    if (stages.size() == 1) {
      uint32_t b = 0;
      for (uint32_t e : ends) {
        f(b, e);
        b = e;
      }
      return;
    }
    // Later stages split each word again (e.g. Split followed by ByteLevel with use_regex).
    std::vector<std::pair<uint32_t, uint32_t>> words, next;
    uint32_t b = 0;
    for (uint32_t e : ends) {
      words.emplace_back(b, e);
      b = e;
    }
    std::vector<uint32_t> sub;
    for (size_t k = 1; k < stages.size(); ++k) {
      next.clear();
      for (const auto& w : words) {
        sub.clear();
        tokenizer::split_pretokens(stages[k], piece.substr(w.first, w.second - w.first), sub);
        uint32_t wb = w.first;
        for (uint32_t we : sub) {
          next.emplace_back(wb, w.first + we);
          wb = w.first + we;
        }
      }
      words.swap(next);
    }
    for (const auto& w : words) f(w.first, w.second);
  }
  void encode_word(const unsigned char* w, size_t n, std::vector<int32_t>& out) const;
  void bpe(const unsigned char* w, size_t n, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load(const json::Value& root) {
  if (!root.is_object()) throw_error("tokenizer.json: the document must be a JSON object");
  if (const json::Value* v = root.find("normalizer"); v && !v->is_null())
    unsupported("normalizer", type_of(*v, "normalizer"));
  load_model(root.at("model"));
  if (const json::Value* v = root.find("added_tokens"); v && !v->is_null()) load_added(*v);
  const json::Value* pt = root.find("pre_tokenizer");
  if (!pt || pt->is_null()) unsupported("pre_tokenizer", "null");
  load_pre_tokenizer(*pt);
  if (const json::Value* pp = root.find("post_processor"); pp && !pp->is_null())
    load_post_processor(*pp, &prefix_ids, &suffix_ids);
  const json::Value* dec = root.find("decoder");
  if (!dec || dec->is_null()) unsupported("decoder", "null");
  const std::string dt = type_of(*dec, "decoder");
  if (dt != "ByteLevel") unsupported("decoder", dt);

  if (options.add_bos_token || options.add_eos_token) {
    // transformers replaces the post-processor with "[bos] $A [eos]" when either flag is given.
    prefix_ids.clear();
    suffix_ids.clear();
    if (options.add_bos_token.value_or(false)) {
      if (options.bos_token_id < 0) throw_error("tokenizer options: add_bos_token is set but bos_token_id is not");
      prefix_ids.push_back(options.bos_token_id);
    }
    if (options.add_eos_token.value_or(false)) {
      if (options.eos_token_id < 0) throw_error("tokenizer options: add_eos_token is set but eos_token_id is not");
      suffix_ids.push_back(options.eos_token_id);
    }
  }
  build_decoder();
}

void Tokenizer::Impl::load_model(const json::Value& model) {
  const std::string type = type_of(model, "model");
  if (type != "BPE") unsupported("model.type", type);
  if (const json::Value* d = model.find("dropout"); d && !d->is_null() && d->as_double("model.dropout") != 0.0)
    unsupported("model.dropout", "(BPE dropout is for training)");
  if (get_bool(model, "byte_fallback", false, "model")) unsupported("model.byte_fallback", "true");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json::Value* v = model.find(key);
    if (v && !v->is_null() && !v->as_string(key).empty()) unsupported(std::string("model.") + key, v->as_string());
  }
  ignore_merges = get_bool(model, "ignore_merges", false, "model");
  fuse_unk = get_bool(model, "fuse_unk", false, "model");

  const auto& entries = model.at("vocab").as_object("tokenizer.json: model.vocab");
  vocab.reserve(entries.size() * 2);
  vocab_bytes.reserve(entries.size() * 2);
  std::string raw;
  for (const auto& kv : entries) {
    const int64_t id = kv.second.as_int("tokenizer.json: model.vocab value");
    if (id < 0 || id >= kMaxTokenId) throw_error("tokenizer.json: model.vocab id ", id, " is out of range");
    vocab[kv.first] = static_cast<int32_t>(id);  // a repeated key keeps its last id, as serde does
  }
  for (const auto& kv : vocab) {
    const size_t id = static_cast<size_t>(kv.second);
    if (id >= vocab_r.size()) {
      vocab_r.resize(id + 1);
      vocab_has.resize(id + 1, false);
    }
    vocab_r[id] = kv.first;
    vocab_has[id] = true;
    if (byte_level_to_bytes(kv.first, &raw)) vocab_bytes[raw] = kv.second;
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    json::append_utf8(ch, byte_level().byte_to_char[b]);
    auto it = vocab.find(ch);
    byte_id[b] = it == vocab.end() ? -1 : it->second;
  }
  if (const json::Value* unk = model.find("unk_token"); unk && !unk->is_null()) {
    auto it = vocab.find(unk->as_string("model.unk_token"));
    if (it == vocab.end()) throw_error("tokenizer.json: model.unk_token '", unk->as_string(), "' is not in the vocab");
    unk_id = it->second;
  }

  const auto& list = model.at("merges").as_array("tokenizer.json: model.merges");
  merges.reserve(list.size());
  for (size_t rank = 0; rank < list.size(); ++rank) {
    const json::Value& m = list[rank];
    std::string a, b;
    if (m.is_string()) {
      const std::string& s = m.as_string();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw_error("tokenizer.json: merge ", rank, " '", s, "' is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      const auto& pair = m.as_array("tokenizer.json: model.merges entry");
      if (pair.size() != 2) throw_error("tokenizer.json: merge ", rank, " must have two tokens");
      a = pair[0].as_string("merge token");
      b = pair[1].as_string("merge token");
    }
    auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
    if (ia == vocab.end() || ib == vocab.end() || iab == vocab.end())
      throw_error("tokenizer.json: merge ", rank, " ('", a, "', '", b, "') uses a token missing from the vocab");
    merges.insert(ia->second, ib->second, static_cast<uint32_t>(rank), iab->second);
  }
}

void Tokenizer::Impl::load_added(const json::Value& list) {
  // Ids are assigned as HF's AddedVocabulary does: an existing token keeps its id, a new one gets
  // the next free id past the model vocab. We insist that this agrees with the file's "id".
  // The largest id in added_by_content, kept as we go (a content's id never changes once added), so
  // that many added tokens load in linear time.
  int32_t max_added = -1;
  for (const json::Value& t : list.as_array("tokenizer.json: added_tokens")) {
    AddedToken a;
    a.content = t.at("content").as_string("tokenizer.json: added_tokens[].content");
    const int64_t file_id = t.at("id").as_int("tokenizer.json: added_tokens[].id");
    if (file_id < 0 || file_id >= kMaxTokenId) throw_error("tokenizer.json: added token id ", file_id, " is out of range");
    a.special = get_bool(t, "special", false, "added_tokens[]");
    a.lstrip = get_bool(t, "lstrip", false, "added_tokens[]");
    a.rstrip = get_bool(t, "rstrip", false, "added_tokens[]");
    a.single_word = get_bool(t, "single_word", false, "added_tokens[]");
    a.normalized = get_bool(t, "normalized", !a.special, "added_tokens[]");
    if (a.content.empty()) continue;
    if (a.special) special_contents.insert(a.content);
    int32_t id = token_to_id(a.content);
    if (id < 0) {
      const int32_t model_size = static_cast<int32_t>(vocab.size());
      id = (max_added < 0) ? model_size : (max_added >= model_size ? max_added + 1 : model_size);
    }
    if (id != file_id)
      throw_error("tokenizer.json: added token '", a.content, "' has id ", file_id, " but HF tokenizers would give it id ",
                  id, "; such a file is not supported");
    a.id = id;
    if (auto it = added_by_id.find(id); it != added_by_id.end()) {
      added[it->second] = a;  // same id re-declared: the later declaration wins
    } else {
      added_by_id[id] = added.size();
      added.push_back(a);
    }
    added_by_content[a.content] = id;
    max_added = std::max(max_added, id);
  }
  std::vector<const AddedToken*> raw, norm;
  // With no normalizer, a "normalized" token is still matched only in what the first pass left.
  for (const AddedToken& a : added) (a.normalized ? norm : raw).push_back(&a);
  raw_set.build(raw);
  normalized_set.build(norm);
}

void Tokenizer::Impl::load_pre_tokenizer(const json::Value& pt) {
  const std::string type = type_of(pt, "pre_tokenizer");
  auto add_one = [&](const json::Value& p, const std::string& where) {
    const std::string t = type_of(p, where);
    if (t == "ByteLevel") {
      if (get_bool(p, "add_prefix_space", true, where)) unsupported(where + ".add_prefix_space", "true");
      if (get_bool(p, "use_regex", true, where)) stages.push_back(SplitPattern::Gpt2);
    } else if (t == "Split") {
      const json::Value& pat = p.at("pattern");
      const json::Value* re = pat.find("Regex");
      if (!re) unsupported(where + ".pattern", "(only Regex patterns are supported)");
      SplitPattern sp;
      if (!tokenizer::split_pattern_from_regex(re->as_string(), &sp)) unsupported(where + ".pattern.Regex", re->as_string());
      const std::string behavior = p.at("behavior").as_string("Split.behavior");
      const bool invert = get_bool(p, "invert", false, where);
      // The pattern matches every character, so these settings all keep each match as one piece.
      if (!(behavior == "Isolated" || (behavior == "Removed" && invert)))
        unsupported(where + ".behavior/invert", behavior + (invert ? "/true" : "/false"));
      stages.push_back(sp);
    } else {
      unsupported(where + ".type", t);
    }
  };
  if (type == "Sequence") {
    const auto& list = pt.at("pretokenizers").as_array("pre_tokenizer.pretokenizers");
    for (size_t i = 0; i < list.size(); ++i) add_one(list[i], "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]");
  } else {
    add_one(pt, "pre_tokenizer");
  }
  if (stages.empty()) unsupported("pre_tokenizer", "(no splitting regex)");
}

void Tokenizer::Impl::load_post_processor(const json::Value& pp, std::vector<int32_t>* pre, std::vector<int32_t>* post) {
  const std::string type = type_of(pp, "post_processor");
  if (type == "ByteLevel") return;  // only trims offsets
  if (type == "Sequence") {
    for (const json::Value& p : pp.at("processors").as_array("post_processor.processors")) {
      std::vector<int32_t> a, b;
      load_post_processor(p, &a, &b);
      pre->insert(pre->begin(), a.begin(), a.end());
      post->insert(post->end(), b.begin(), b.end());
    }
    return;
  }
  if (type != "TemplateProcessing") unsupported("post_processor.type", type);
  const json::Value& specials = pp.at("special_tokens");
  bool seen_a = false;
  for (const json::Value& item : pp.at("single").as_array("post_processor.single")) {
    if (const json::Value* st = item.find("SpecialToken")) {
      const std::string& name = st->at("id").as_string("SpecialToken.id");
      const json::Value* sp = specials.find(name);
      if (!sp) throw_error("tokenizer.json: post_processor uses special token '", name, "' missing from special_tokens");
      for (const json::Value& id : sp->at("ids").as_array("special_tokens.ids"))
        (seen_a ? post : pre)->push_back(static_cast<int32_t>(id.as_int("special_tokens.ids[]")));
    } else if (const json::Value* seq = item.find("Sequence")) {
      const std::string& which = seq->at("id").as_string("Sequence.id");
      if (which != "A" || seen_a) unsupported("post_processor.single", "sequence " + which);
      seen_a = true;
    } else {
      unsupported("post_processor.single", "item");
    }
  }
  if (!seen_a) unsupported("post_processor.single", "(no $A)");
}

void Tokenizer::Impl::build_decoder() {
  int32_t max_id = static_cast<int32_t>(vocab_r.size()) - 1;
  for (const AddedToken& a : added) max_id = std::max(max_id, a.id);
  const size_t space = static_cast<size_t>(max_id + 1);
  dec_offset.assign(space + 1, 0);
  dec_flags.assign(space, 0);
  std::string raw;
  for (size_t id = 0; id < space; ++id) {
    dec_offset[id] = static_cast<uint32_t>(dec_bytes.size());
    const std::string* tok = id_to_token(static_cast<int32_t>(id));
    if (!tok) continue;
    dec_flags[id] = 1 | (special_contents.count(*tok) ? 2 : 0);
    if (byte_level_to_bytes(*tok, &raw)) dec_bytes += raw;
    else dec_bytes += *tok;
  }
  dec_offset[space] = static_cast<uint32_t>(dec_bytes.size());
  std::unordered_set<std::string> all;
  for (const auto& kv : vocab) all.insert(kv.first);
  for (const auto& kv : added_by_content) all.insert(kv.first);
  vocab_size_with_added = all.size();
}

// HF AddedVocabulary::find_matches on one piece of text.
void Tokenizer::Impl::find_added(std::string_view s, uint32_t base, const LiteralSet& set, std::vector<Piece>& out) const {
  auto flags_before = [&](size_t pos) -> uint8_t {  // flags of the character ending at pos
    size_t k = pos;
    do --k; while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80);
    size_t len;
    return unicode::char_flags(tokenizer::decode_utf8(reinterpret_cast<const unsigned char*>(s.data()), k, &len));
  };
  auto flags_at = [&](size_t pos, size_t* len) -> uint8_t {
    return unicode::char_flags(tokenizer::decode_utf8(reinterpret_cast<const unsigned char*>(s.data()), pos, len));
  };
  size_t start_offset = 0;
  size_t i = 0;
  while (i < s.size()) {
    size_t len = 0;
    const AddedToken* t = set.longest_at(s, i, &len);
    if (!t) {
      ++i;
      continue;
    }
    size_t start = i, stop = i + len;
    i = stop;  // the search resumes after the match even when it is discarded below
    if (t->single_word) {
      size_t l;
      const bool start_space = start == 0 || !(flags_before(start) & unicode::kWord);
      const bool stop_space = stop == s.size() || !(flags_at(stop, &l) & unicode::kWord);
      if (!start_space || !stop_space) continue;
    }
    if (t->lstrip) {
      size_t k = start;
      while (k > 0 && (flags_before(k) & unicode::kSpace)) {
        do --k; while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80);
      }
      start = std::max(k, start_offset);
    }
    if (t->rstrip) {
      size_t l;
      while (stop < s.size() && (flags_at(stop, &l) & unicode::kSpace)) stop += l;
    }
    if (start_offset < start) out.push_back({base + uint32_t(start_offset), base + uint32_t(start), -1});
    out.push_back({base + uint32_t(start), base + uint32_t(stop), t->id});
    start_offset = stop;
  }
  if (start_offset < s.size()) out.push_back({base + uint32_t(start_offset), base + uint32_t(s.size()), -1});
}

void Tokenizer::Impl::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<Piece> pieces;
  if (!raw_set.empty()) {
    find_added(text, 0, raw_set, pieces);
  } else if (!text.empty()) {
    pieces.push_back({0, static_cast<uint32_t>(text.size()), -1});
  }
  if (!normalized_set.empty()) {
    std::vector<Piece> second;
    for (const Piece& p : pieces) {
      if (p.id >= 0) second.push_back(p);
      else find_added(text.substr(p.begin, p.end - p.begin), p.begin, normalized_set, second);
    }
    pieces.swap(second);
  }
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (const Piece& p : pieces) {
    if (p.id >= 0) {
      out.push_back(p.id);
      continue;
    }
    for_each_word(text.substr(p.begin, p.end - p.begin),
                  [&](size_t b, size_t e) { encode_word(s + p.begin + b, e - b, out); });
  }
}

void Tokenizer::Impl::encode_word(const unsigned char* w, size_t n, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab_bytes.find(std::string(reinterpret_cast<const char*>(w), n));
    if (it != vocab_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (n == 1 && byte_id[w[0]] >= 0) {
    out.push_back(byte_id[w[0]]);
    return;
  }
  if (n > WordCache::kMaxBytes) {
    bpe(w, n, out);
    return;
  }
  // A thread keeps caches for the last few tokenizers it used (a process may hold several engines).
  thread_local WordCache caches[4];
  thread_local unsigned next_victim = 0;
  WordCache* found = nullptr;
  for (WordCache& c : caches)
    if (c.owner == serial) found = &c;
  if (!found) {
    found = &caches[next_victim++ % 4];
    found->entries.assign(WordCache::kEntries, WordCache::Entry{});
    found->owner = serial;
  }
  WordCache& cache = *found;
  const uint64_t h = hash_bytes(w, n);
  WordCache::Entry& e = cache.entries[h & (WordCache::kEntries - 1)];
  if (e.hash == h && e.len == n && std::memcmp(e.bytes, w, n) == 0) {
    out.insert(out.end(), e.ids, e.ids + e.nids);
    return;
  }
  const size_t before = out.size();
  bpe(w, n, out);
  const size_t produced = out.size() - before;
  if (produced <= WordCache::kMaxIds) {
    e.hash = h;
    e.len = static_cast<uint8_t>(n);
    e.nids = static_cast<uint8_t>(produced);
    std::memcpy(e.bytes, w, n);
    std::memcpy(e.ids, out.data() + before, produced * sizeof(int32_t));
  }
}

void Tokenizer::Impl::bpe(const unsigned char* w, size_t n, std::vector<int32_t>& out) const {
  // Initial symbols: one per byte; a byte missing from the vocab becomes unk (fused if fuse_unk) or
  // is dropped when there is no unk token, as HF's BPE::merge_word does.
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Sym> sym;
  sym.reserve(n);
  int32_t pending_unk = 0;  // count of unk bytes not yet pushed (fuse_unk)
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = byte_id[w[i]];
    if (id >= 0) {
      if (pending_unk) {
        sym.push_back({unk_id, 0, 0, true});
        pending_unk = 0;
      }
      sym.push_back({id, 0, 0, true});
    } else if (unk_id >= 0) {
      if (pending_unk && !fuse_unk) sym.push_back({unk_id, 0, 0, true});
      pending_unk = 1;
    }
  }
  if (pending_unk) sym.push_back({unk_id, 0, 0, true});
  const int32_t m = static_cast<int32_t>(sym.size());
  if (m == 0) return;
  uint32_t rank;
  int32_t merged;
  if (m <= 48) {
    // Small words: keep the live ids in an array with each adjacent pair's rank and merge the
    // leftmost lowest-rank pair until none is left. Same result as the heap below.
    int32_t ids[48];
    uint32_t ranks[48];
    int32_t news[48];
    int32_t k = m;
    for (int32_t i = 0; i < k; ++i) ids[i] = sym[i].id;
    auto pair_rank = [&](int32_t i) {
      if (merges.find(ids[i], ids[i + 1], &rank, &merged)) {
        ranks[i] = rank;
        news[i] = merged;
      } else {
        ranks[i] = UINT32_MAX;
      }
    };
    for (int32_t i = 0; i + 1 < k; ++i) pair_rank(i);
    while (k > 1) {
      int32_t best = -1;
      uint32_t best_rank = UINT32_MAX;
      for (int32_t i = 0; i + 1 < k; ++i)
        if (ranks[i] < best_rank) {
          best_rank = ranks[i];
          best = i;
        }
      if (best < 0) break;
      ids[best] = news[best];
      for (int32_t i = best + 1; i + 1 < k; ++i) {
        ids[i] = ids[i + 1];
        ranks[i] = ranks[i + 1];
        news[i] = news[i + 1];
      }
      --k;
      if (best + 1 < k) pair_rank(best);
      else ranks[best] = UINT32_MAX;
      if (best > 0) pair_rank(best - 1);
    }
    out.insert(out.end(), ids, ids + k);
    return;
  }
  // Long words: HF's algorithm, a min-heap of candidate merges ordered by (rank, position) with
  // stale entries skipped when popped.
  for (int32_t i = 0; i < m; ++i) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < m ? i + 1 : -1;
  }
  struct Cand {
    uint32_t rank;
    int32_t pos;
    int32_t merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  for (int32_t i = 0; i + 1 < m; ++i)
    if (merges.find(sym[i].id, sym[i + 1].id, &rank, &merged)) heap.push({rank, i, merged});
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& left = sym[c.pos];
    if (!left.alive || left.next < 0) continue;
    Sym& right = sym[left.next];
    if (!merges.find(left.id, right.id, &rank, &merged) || merged != c.merged) continue;
    left.id = c.merged;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = c.pos;
    if (left.prev >= 0 && merges.find(sym[left.prev].id, left.id, &rank, &merged))
      heap.push({rank, left.prev, merged});
    if (left.next >= 0 && merges.find(left.id, sym[left.next].id, &rank, &merged))
      heap.push({rank, c.pos, merged});
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
}

// ------------------------------------------------------------------------------------ Tokenizer

Tokenizer::Tokenizer(std::string_view tokenizer_json, TokenizerOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  impl_->serial = g_tokenizer_serial.fetch_add(1);
  json::Value root;
  try {
    root = json::parse(tokenizer_json);
  } catch (const Error& e) {
    throw_error("tokenizer.json: ", e.what());
  }
  impl_->load(root);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view options_json) {
  return Tokenizer(tokenizer_json, TokenizerOptions::from_json(options_json));
}

Tokenizer Tokenizer::from_file(const std::string& path, TokenizerOptions options) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_error("cannot open tokenizer file ", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  try {
    return Tokenizer(ss.str(), std::move(options));
  } catch (const Error& e) {
    throw_error(path, ": ", e.what());
  }
}

namespace {
void check_input(std::string_view text) {
  if (text.size() >= (size_t(1) << 32)) throw_error("input of ", text.size(), " bytes is too long to tokenize (4 GiB limit)");
  for (size_t i = 0; i < text.size();) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t n = json::utf8_sequence_length(text, i);
    if (n == 0) throw_error("input is not valid UTF-8 at byte ", i);
    i += n;
  }
}
}  // namespace

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  check_input(text);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), impl_->prefix_ids.begin(), impl_->prefix_ids.end());
  impl_->encode_text(text, out);
  if (add_special_tokens) out.insert(out.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return out;
}

void Tokenizer::append_token_bytes(int32_t id, bool skip_special_tokens, std::string& out) const {
  const Impl& m = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= m.dec_flags.size()) return;
  const uint8_t f = m.dec_flags[id];
  if (!(f & 1) || (skip_special_tokens && (f & 2))) return;
  out.append(m.dec_bytes, m.dec_offset[id], m.dec_offset[id + 1] - m.dec_offset[id]);
}

std::string Tokenizer::decode(const int32_t* ids, size_t n, bool skip_special_tokens) const {
  std::string bytes;
  for (size_t i = 0; i < n; ++i) append_token_bytes(ids[i], skip_special_tokens, bytes);
  std::string out;
  out.reserve(bytes.size());
  append_utf8_lossy(bytes, out);
  return out;
}

int32_t Tokenizer::token_to_id(std::string_view token) const { return impl_->token_to_id(token); }

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  const std::string* t = impl_->id_to_token(id);
  if (!t) return std::nullopt;
  return *t;
}

size_t Tokenizer::vocab_size() const { return impl_->vocab_size_with_added; }
size_t Tokenizer::id_space() const { return impl_->dec_flags.size(); }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->dec_flags.size() && (impl_->dec_flags[id] & 2);
}
const TokenizerOptions& Tokenizer::options() const { return impl_->options; }

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  check_input(text);
  std::vector<std::string> words;
  impl_->for_each_word(text, [&](size_t b, size_t e) { words.emplace_back(text.substr(b, e - b)); });
  return words;
}

// ------------------------------------------------------------------------------------ UTF-8

size_t append_utf8_lossy(std::string_view bytes, std::string& out, bool keep_incomplete_tail) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      size_t j = i + 1;
      while (j < n && s[j] < 0x80) ++j;
      out.append(bytes.data() + i, j - i);
      i = j;
      continue;
    }
    // Expected length and the allowed range of the second byte (Unicode Table 3-7).
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
      need = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    size_t k = 1;  // bytes of the maximal valid prefix
    while (k < need && i + k < n) {
      const unsigned char d = s[i + k];
      if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) break;
      ++k;
    }
    if (k == need) {
      out.append(bytes.data() + i, need);
    } else if (i + k == n && keep_incomplete_tail) {
      return n - i;
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += k;
  }
  return 0;
}

std::string StreamDecoder::step(int32_t id) {
  tok_->append_token_bytes(id, skip_special_, pending_);
  std::string out;
  const size_t tail = append_utf8_lossy(pending_, out, /*keep_incomplete_tail=*/true);
  pending_.erase(0, pending_.size() - tail);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  append_utf8_lossy(pending_, out);
  pending_.clear();
  return out;
}

}  // namespace afs
