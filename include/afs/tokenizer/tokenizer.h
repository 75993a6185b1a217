// Byte-level BPE tokenizer with exact Hugging Face `tokenizers` parity, for OLMo 2 style tokenizer.json.
//
// Construct it from the tokenizer.json text (stored verbatim in model.afs) plus TokenizerOptions (the
// manifest's "tokenizer" section). What is supported is exactly what tokenizer.json can say for the
// OLMo 2 / Llama 3 / GPT-2 family; anything else is rejected at construction with an afs::Error that
// names the field and its value:
//   normalizer      null
//   pre_tokenizer   Split(the cl100k or GPT-2 regex, invert) and/or ByteLevel, alone or in a Sequence
//   model           BPE (no dropout, no byte_fallback, no subword prefix/suffix; ignore_merges honoured)
//   post_processor  null, ByteLevel, TemplateProcessing, or a Sequence of those
//   decoder         ByteLevel
//   added_tokens    any, with their special / lstrip / rstrip / single_word / normalized flags
// truncation and padding are ignored: an engine never truncates a prompt behind the user's back.
//
// Thread safety: a constructed Tokenizer is immutable; encode/decode may run concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace afs {

// The manifest's "tokenizer" section (afs_build/tokenizer.py writes it; see there for the sources).
struct TokenizerOptions {
  int32_t bos_token_id = -1;  // -1: none
  int32_t eos_token_id = -1;
  int32_t pad_token_id = -1;
  std::vector<int32_t> eos_token_ids;  // every id that ends generation (generation_config.json)
  // From tokenizer_config.json. When either is set, encode(add_special_tokens=true) yields
  // [bos] text [eos] per flag instead of applying tokenizer.json's post_processor: transformers
  // rebuilds the post-processor the same way when tokenizer_config.json names either flag.
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;

  // Parses {"bos_token_id": 1, "add_bos_token": null, ...}; unknown keys are ignored.
  static TokenizerOptions from_json(std::string_view json_text);
  std::string to_json() const;
};

class Tokenizer {
 public:
  explicit Tokenizer(std::string_view tokenizer_json, TokenizerOptions options = {});
  // From the manifest form: tokenizer.json text and the options JSON text ("" for defaults).
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view options_json);
  static Tokenizer from_file(const std::string& tokenizer_json_path, TokenizerOptions options = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // text must be valid UTF-8; otherwise throws afs::Error("input is not valid UTF-8 at byte N").
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Unknown ids are skipped (as HF does). Invalid UTF-8 from byte-level tokens becomes U+FFFD with
  // the same replacement rule as Rust's String::from_utf8_lossy and Python's errors="replace".
  std::string decode(const int32_t* ids, size_t n, bool skip_special_tokens = false) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const {
    return decode(ids.data(), ids.size(), skip_special_tokens);
  }

  int32_t token_to_id(std::string_view token) const;  // -1 if absent
  std::optional<std::string> id_to_token(int32_t id) const;
  // HF get_vocab_size(with_added_tokens=True): distinct tokens of the model vocab and added tokens.
  size_t vocab_size() const;
  // One past the largest id (the rows an embedding needs).
  size_t id_space() const;
  bool is_special(int32_t id) const;
  const TokenizerOptions& options() const;

  // Pre-tokenizer output for the text between added tokens (for tests and debugging).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  // Appends the raw bytes token `id` decodes to (nothing for unknown ids, or skipped specials).
  void append_token_bytes(int32_t id, bool skip_special_tokens, std::string& out) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer: feed ids one at a time, get back the text that became complete. It never
// returns part of a UTF-8 character; the concatenation of every step() and the final flush() equals
// decode() of all the ids. Holds a reference to the tokenizer, which must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tok_(&tokenizer), skip_special_(skip_special_tokens) {}
  std::string step(int32_t id);
  // Text still held back (an incomplete UTF-8 sequence at the end, as U+FFFD); resets the decoder.
  std::string flush();
  void reset() { pending_.clear(); }

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete trailing UTF-8 sequence
};

// Appends `bytes` to out as UTF-8, replacing each maximal invalid subpart by U+FFFD (the
// WHATWG / Rust from_utf8_lossy / Python errors="replace" rule). If `keep_incomplete_tail` is set, an
// incomplete but so-far-valid sequence at the very end is not converted; its length is returned.
size_t append_utf8_lossy(std::string_view bytes, std::string& out, bool keep_incomplete_tail = false);

}  // namespace afs
