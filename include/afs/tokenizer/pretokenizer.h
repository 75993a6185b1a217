// Hand-written matchers for the pre-tokenizer regexes of the OLMo 2 / GPT-2 family (no regex engine).
//
// Each matcher reproduces, at every position, the match that HF tokenizers' Oniguruma engine finds
// for the pattern (leftmost alternative that matches, greedy quantifiers, backtracking where it
// changes the result), with the Unicode classes of unicode_tables.h. Both patterns match every
// character, so splitting a text yields pieces that tile it exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "afs/tokenizer/unicode_tables.h"

namespace afs::tokenizer {

enum class SplitPattern : uint8_t {
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+     (OLMo 2, Llama 3; tiktoken's cl100k_base spelling is accepted too)
  Cl100k,
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+   (GPT-2, ByteLevel)
  Gpt2,
};

// The pattern a tokenizer.json regex string denotes; false if it is not one we implement.
bool split_pattern_from_regex(std::string_view regex, SplitPattern* out);

// Splits valid UTF-8 `text` into pieces; appends the end offset (exclusive, in bytes, relative to
// text) of each piece to `ends`. Pieces are never empty and cover the text.
void split_pretokens(SplitPattern pattern, std::string_view text, std::vector<uint32_t>& ends);

// Decodes the code point at s[i] (valid UTF-8 assumed); stores its byte length in *len.
inline uint32_t decode_utf8(const unsigned char* s, size_t i, size_t* len) {
  const unsigned char c = s[i];
  if (c < 0x80) { *len = 1; return c; }
  if (c < 0xE0) { *len = 2; return ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu); }
  if (c < 0xF0) { *len = 3; return ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu); }
  *len = 4;
  return ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
}

}  // namespace afs::tokenizer
