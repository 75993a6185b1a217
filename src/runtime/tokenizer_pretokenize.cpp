// The cl100k (OLMo 2) and GPT-2 pre-tokenizer regexes as hand-written matchers; see pretokenizer.h.
//
// NOTE: the alternatives are tried in the regex's order at each position and every alternative can
// only start at that position, because the patterns match every character (the pieces tile the text).
#include "afs/tokenizer/pretokenizer.h"

#include <array>

namespace afs::tokenizer {
namespace {

using unicode::kLetter;
using unicode::kNumber;
using unicode::kSpace;
constexpr uint8_t kLNS = kLetter | kNumber | kSpace;

const std::array<uint8_t, 128>& ascii_flags() {
  static const std::array<uint8_t, 128> table = [] {
    std::array<uint8_t, 128> t{};
    for (uint32_t c = 0; c < 128; ++c) t[c] = unicode::char_flags(c);
    return t;
  }();
  return table;
}

struct Text {
  const unsigned char* s;
  size_t n;
  const uint8_t* ascii;

  uint8_t cls(size_t i, size_t* len) const {
    const unsigned char c = s[i];
    if (c < 0x80) {
      *len = 1;
      return ascii[c];
    }
    return unicode::char_flags(decode_utf8(s, i, len));
  }
  size_t skip(size_t j, uint8_t want) const {  // past every char whose flags intersect `want`
    size_t len;
    while (j < n && (cls(j, &len) & want)) j += len;
    return j;
  }
  size_t skip_other(size_t j) const {  // past [^\s\p{L}\p{N}]*
    size_t len;
    while (j < n && !(cls(j, &len) & kLNS)) j += len;
    return j;
  }
  bool is_crlf(size_t j) const { return s[j] == '\r' || s[j] == '\n'; }

  // The three whitespace alternatives \s*[\r\n]+ (if with_newline_rule), \s+(?!\S), \s+ at i,
  // where s[i] is whitespace.
  size_t match_space(size_t i, bool with_newline_rule) const {
    size_t j = i, last_char = i, last_crlf = n, len;
    while (j < n && (cls(j, &len) & kSpace)) {
      if (is_crlf(j)) last_crlf = j;
      last_char = j;
      j += len;
    }
    // \s*[\r\n]+ : \s* backtracks to the last CR/LF of the run, which [\r\n]+ then takes alone.
    if (with_newline_rule && last_crlf != n) return last_crlf + 1;
    // \s+(?!\S) : the whole run at the end of text, else the run less its last character.
    if (j == n) return j;
    if (last_char > i) return last_char;
    return j;  // \s+
  }
};

inline unsigned char ascii_lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

size_t match_cl100k(const Text& t, size_t i) {
  const unsigned char* s = t.s;
  const size_t n = t.n;
  const unsigned char c0 = s[i];
  // (?i:'s|'t|'re|'ve|'m|'ll|'d) -- case folding also maps U+017F (long s) to s.
  if (c0 == '\'' && i + 1 < n) {
    const unsigned char a = ascii_lower(s[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return i + 3;
    if (i + 2 < n) {
      const unsigned char b = ascii_lower(s[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  size_t l0;
  const uint8_t f0 = t.cls(i, &l0);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (f0 & kLetter) return t.skip(i + l0, kLetter);
  if (!(f0 & (kLetter | kNumber)) && c0 != '\r' && c0 != '\n' && i + l0 < n) {
    size_t l1;
    if (t.cls(i + l0, &l1) & kLetter) return t.skip(i + l0 + l1, kLetter);
  }
  // \p{N}{1,3}
  if (f0 & kNumber) {
    size_t j = i + l0, len;
    for (int k = 0; k < 2 && j < n && (t.cls(j, &len) & kNumber); ++k) j += len;
    return j;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  size_t k = n + 1;
  if (c0 == ' ' && i + 1 < n) {
    size_t l1;
    if (!(t.cls(i + 1, &l1) & kLNS)) k = i + 1 + l1;
  }
  if (k == n + 1 && !(f0 & kLNS)) k = i + l0;
  if (k != n + 1) {
    k = t.skip_other(k);
    while (k < n && t.is_crlf(k)) ++k;
    return k;
  }
  // s[i] is whitespace: \s*[\r\n]+ | \s+(?!\S) | \s+
  return t.match_space(i, /*with_newline_rule=*/true);
}

size_t match_gpt2(const Text& t, size_t i) {
  const unsigned char* s = t.s;
  const size_t n = t.n;
  const unsigned char c0 = s[i];
  // 's|'t|'re|'ve|'m|'ll|'d
  if (c0 == '\'' && i + 1 < n) {
    const unsigned char a = s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      const unsigned char b = s[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+
  size_t k = i, len;
  uint8_t f = t.cls(i, &len);
  if (c0 == ' ' && i + 1 < n) {
    k = i + 1;
    f = t.cls(k, &len);
  }
  if (f & kLetter) return t.skip(k + len, kLetter);
  if (f & kNumber) return t.skip(k + len, kNumber);
  if (!(f & kLNS)) return t.skip_other(k + len);
  // \s+(?!\S) | \s+
  return t.match_space(i, /*with_newline_rule=*/false);
}

}  // namespace

bool split_pattern_from_regex(std::string_view regex, SplitPattern* out) {
  static constexpr std::string_view kCl100k =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  // tiktoken's own spelling of cl100k_base: the same matches (possessive forms change nothing here).
  static constexpr std::string_view kCl100kTiktoken =
      R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)";
  static constexpr std::string_view kGpt2 =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  if (regex == kCl100k || regex == kCl100kTiktoken) {
    *out = SplitPattern::Cl100k;
    return true;
  }
  if (regex == kGpt2) {
    *out = SplitPattern::Gpt2;
    return true;
  }
  return false;
}

void split_pretokens(SplitPattern pattern, std::string_view text, std::vector<uint32_t>& ends) {
  const Text t{reinterpret_cast<const unsigned char*>(text.data()), text.size(), ascii_flags().data()};
  size_t i = 0;
  if (pattern == SplitPattern::Cl100k) {
    while (i < t.n) {
      i = match_cl100k(t, i);
      ends.push_back(static_cast<uint32_t>(i));
    }
  } else {
    while (i < t.n) {
      i = match_gpt2(t, i);
      ends.push_back(static_cast<uint32_t>(i));
    }
  }
}

}  // namespace afs::tokenizer
