// A small, strict JSON reader for the engine manifest, tokenizer.json and request bodies.
//
// Strict RFC 8259: no comments, no trailing commas, no NaN literals, strings must be valid UTF-8 and
// \u escapes must pair surrogates. Depth is bounded so hostile input cannot blow the stack. Errors
// throw afs::Error with the byte offset. Objects keep their key order (tokenizer merges rely on it)
// and look-ups are linear, which is fine for the sizes we read; the vocab is walked, never searched.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "afs/error.h"

namespace afs::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;
  static Value make_bool(bool b) { Value v; v.type_ = Type::Bool; v.bool_ = b; return v; }
  static Value make_number(double d, bool is_int, int64_t i) {
    Value v; v.type_ = Type::Number; v.num_ = d; v.is_int_ = is_int; v.int_ = i; return v;
  }
  static Value make_string(std::string s) { Value v; v.type_ = Type::String; v.str_ = std::move(s); return v; }
  static Value make_array() { Value v; v.type_ = Type::Array; return v; }
  static Value make_object() { Value v; v.type_ = Type::Object; return v; }

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_int() const { return type_ == Type::Number && is_int_; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool as_bool(const char* what = "value") const {
    if (!is_bool()) throw_error(what, " must be a boolean");
    return bool_;
  }
  double as_double(const char* what = "value") const {
    if (!is_number()) throw_error(what, " must be a number");
    return num_;
  }
  int64_t as_int(const char* what = "value") const {
    if (!is_int()) throw_error(what, " must be an integer");
    return int_;
  }
  const std::string& as_string(const char* what = "value") const {
    if (!is_string()) throw_error(what, " must be a string");
    return str_;
  }
  const std::vector<Value>& as_array(const char* what = "value") const {
    if (!is_array()) throw_error(what, " must be an array");
    return arr_;
  }
  const std::vector<std::pair<std::string, Value>>& as_object(const char* what = "value") const {
    if (!is_object()) throw_error(what, " must be an object");
    return obj_;
  }
  std::vector<Value>& mutable_array() { return arr_; }
  std::vector<std::pair<std::string, Value>>& mutable_object() { return obj_; }

  // Object member or nullptr. Throws if this is not an object.
  const Value* find(std::string_view key) const {
    if (!is_object()) throw_error("expected a JSON object when looking up '", key, "'");
    for (const auto& kv : obj_)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  // Object member that must exist.
  const Value& at(std::string_view key) const {
    const Value* v = find(key);
    if (!v) throw_error("missing field '", key, "'");
    return *v;
  }

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  bool is_int_ = false;
  double num_ = 0;
  int64_t int_ = 0;
  std::string str_;
  std::vector<Value> arr_;
  std::vector<std::pair<std::string, Value>> obj_;
};

// Appends the UTF-8 encoding of code point cp (must be a valid scalar value).
inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is not valid (overlong forms,
// surrogates and code points above U+10FFFF are invalid).
inline size_t utf8_sequence_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1F; }
  else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0F; }
  else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07; }
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

inline bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_sequence_length(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

class Parser {
 public:
  explicit Parser(std::string_view text, int max_depth) : s_(text), max_depth_(max_depth) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const char* what) const { throw_error("invalid JSON at byte ", pos_, ": ", what); }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool consume(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) { ++pos_; return true; }
    return false;
  }
  void expect_literal(const char* lit) {
    size_t n = std::strlen(lit);
    if (s_.compare(pos_, n, lit) != 0) fail("unknown literal");
    pos_ += n;
  }

  Value parse_value(int depth) {
    if (depth > max_depth_) fail("nesting too deep");
    if (pos_ >= s_.size()) fail("unexpected end of input");
    switch (s_[pos_]) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value::make_string(parse_string());
      case 't': expect_literal("true"); return Value::make_bool(true);
      case 'f': expect_literal("false"); return Value::make_bool(false);
      case 'n': expect_literal("null"); return Value();
      default: return parse_number();
    }
  }

  Value parse_object(int depth) {
    ++pos_;  // '{'
    Value v = Value::make_object();
    skip_ws();
    if (consume('}')) return v;
    for (;;) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string key");
      std::string key = parse_string();
      skip_ws();
      if (!consume(':')) fail("expected ':'");
      skip_ws();
      v.mutable_object().emplace_back(std::move(key), parse_value(depth + 1));
      skip_ws();
      if (consume('}')) return v;
      if (!consume(',')) fail("expected ',' or '}'");
    }
  }

  Value parse_array(int depth) {
    ++pos_;  // '['
    Value v = Value::make_array();
    skip_ws();
    if (consume(']')) return v;
    for (;;) {
      skip_ws();
      v.mutable_array().push_back(parse_value(depth + 1));
      skip_ws();
      if (consume(']')) return v;
      if (!consume(',')) fail("expected ',' or ']'");
    }
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return v;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') { ++pos_; return out; }
      if (c < 0x20) fail("control character in string");
      if (c == '\\') {
        ++pos_;
        if (pos_ >= s_.size()) fail("unterminated escape");
        const char e = s_[pos_++];
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            uint32_t cp = parse_hex4();
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') fail("unpaired surrogate");
              pos_ += 2;
              uint32_t lo = parse_hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
              fail("unpaired surrogate");
            }
            append_utf8(out, cp);
            break;
          }
          default: fail("unknown escape");
        }
        continue;
      }
      if (c < 0x80) { out += static_cast<char>(c); ++pos_; continue; }
      const size_t n = utf8_sequence_length(s_, pos_);
      if (n == 0) fail("invalid UTF-8 in string");
      out.append(s_.data() + pos_, n);
      pos_ += n;
    }
  }

  Value parse_number() {
    const size_t start = pos_;
    consume('-');
    if (pos_ >= s_.size()) fail("bad number");
    if (s_[pos_] == '0') {
      ++pos_;
    } else if (s_[pos_] >= '1' && s_[pos_] <= '9') {
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    } else {
      fail("unexpected character");
    }
    bool is_int = true;
    if (consume('.')) {
      is_int = false;
      if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') fail("bad fraction");
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      is_int = false;
      ++pos_;
      if (!consume('+')) consume('-');
      if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') fail("bad exponent");
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
    }
    const std::string tok(s_.substr(start, pos_ - start));
    const double d = std::strtod(tok.c_str(), nullptr);
    if (!std::isfinite(d)) fail("number out of range");
    int64_t i = 0;
    if (is_int) {
      errno = 0;
      long long ll = std::strtoll(tok.c_str(), nullptr, 10);
      if (errno == ERANGE) is_int = false;
      else i = ll;
    } else if (d == std::floor(d) && std::fabs(d) < 9.0e15) {
      // 1.0 or 1e3 still count as integers for fields such as rope_theta.
      is_int = true;
      i = static_cast<int64_t>(d);
    }
    return Value::make_number(d, is_int, i);
  }

  std::string_view s_;
  size_t pos_ = 0;
  int max_depth_;
};

inline Value parse(std::string_view text, int max_depth = 128) { return Parser(text, max_depth).parse_document(); }

// Writes s as a JSON string literal (quotes and escapes included).
inline void write_string(std::string& out, std::string_view s) {
  static const char* kHex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Serialises a value back to compact JSON (numbers keep their integer form when they had one).
inline void dump(const Value& v, std::string& out) {
  switch (v.type()) {
    case Value::Type::Null: out += "null"; break;
    case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; break;
    case Value::Type::Number: {
      if (v.is_int()) {
        out += std::to_string(v.as_int());
      } else {
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%.17g", v.as_double());
        out += buf;
      }
      break;
    }
    case Value::Type::String: write_string(out, v.as_string()); break;
    case Value::Type::Array: {
      out += '[';
      bool first = true;
      for (const auto& e : v.as_array()) {
        if (!first) out += ',';
        first = false;
        dump(e, out);
      }
      out += ']';
      break;
    }
    case Value::Type::Object: {
      out += '{';
      bool first = true;
      for (const auto& kv : v.as_object()) {
        if (!first) out += ',';
        first = false;
        write_string(out, kv.first);
        out += ':';
        dump(kv.second, out);
      }
      out += '}';
      break;
    }
  }
}
inline std::string dump(const Value& v) {
  std::string out;
  dump(v, out);
  return out;
}

}  // namespace afs::json
