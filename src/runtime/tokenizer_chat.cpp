// Compiled chat template: JSON loading and application. See afs/tokenizer/chat.h.
#include "afs/tokenizer/chat.h"

#include "afs/error.h"
#include "afs/json.h"
#include "afs/tokenizer/pretokenizer.h"

namespace afs {
namespace {

std::optional<std::string> optional_string(const json::Value* v, const std::string& where) {
  if (!v || v->is_null()) return std::nullopt;
  if (!v->is_string()) throw_error("chat_template: ", where, " must be a string or null");
  return v->as_string();
}

// Python's str.strip(): removes leading and trailing characters for which str.isspace() is true.
std::string_view python_strip(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t b = 0, e = s.size(), len;
  while (b < e && (unicode::char_flags(tokenizer::decode_utf8(p, b, &len)) & unicode::kPySpace)) b += len;
  while (e > b) {
    size_t k = e - 1;
    while (k > b && (p[k] & 0xC0) == 0x80) --k;
    if (!(unicode::char_flags(tokenizer::decode_utf8(p, k, &len)) & unicode::kPySpace)) break;
    e = k;
  }
  return s.substr(b, e - b);
}

}  // namespace

ChatTemplate ChatTemplate::from_json(std::string_view compiled_json) {
  const json::Value v = json::parse(compiled_json);
  if (!v.is_object()) throw_error("chat_template: must be a JSON object");
  const json::Value* format = v.find("format");
  if (!format || !format->is_string() || format->as_string() != "afs-chat-v1")
    throw_error("chat_template: unknown format (expected \"afs-chat-v1\"); rebuild the engine with this afs version");
  ChatTemplate t;
  for (const json::Value& r : v.at("roles").as_array("chat_template.roles")) t.roles_.push_back(r.as_string("role"));
  const size_t n = t.roles_.size();
  if (n == 0) throw_error("chat_template: no roles");
  t.trim_.assign(n, false);
  t.start_.resize(n);
  t.between_.resize(n * n);
  t.end_nogen_.resize(n);
  t.end_gen_.resize(n);
  const json::Value& trim = v.at("trim");
  const json::Value& start = v.at("start");
  const json::Value& between = v.at("between");
  const json::Value& end = v.at("end");
  for (size_t i = 0; i < n; ++i) {
    const std::string& r = t.roles_[i];
    const json::Value* tr = trim.find(r);
    t.trim_[i] = tr && tr->as_bool("chat_template.trim");
    t.start_[i] = optional_string(start.find(r), "start." + r);
    const json::Value* row = between.find(r);
    for (size_t j = 0; j < n; ++j)
      t.between_[i * n + j] = row && !row->is_null() ? optional_string(row->find(t.roles_[j]), "between." + r) : std::nullopt;
    const json::Value* e = end.find(r);
    if (e && !e->is_null()) {
      t.end_nogen_[i] = optional_string(e->find("nogen"), "end." + r + ".nogen");
      t.end_gen_[i] = optional_string(e->find("gen"), "end." + r + ".gen");
    }
  }
  return t;
}

size_t ChatTemplate::role_index(const std::string& role) const {
  for (size_t i = 0; i < roles_.size(); ++i)
    if (roles_[i] == role) return i;
  std::string known;
  for (const auto& r : roles_) known += (known.empty() ? "" : ", ") + r;
  throw_error("the chat template has no role '", role, "' (it supports ", known, ")");
}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (messages.empty()) throw_error("a chat needs at least one message");
  const size_t n = roles_.size();
  std::string out;
  size_t prev = 0;
  for (size_t k = 0; k < messages.size(); ++k) {
    const size_t r = role_index(messages[k].role);
    const std::optional<std::string>& sep = k == 0 ? start_[r] : between_[prev * n + r];
    if (!sep) {
      if (k == 0) throw_error("the chat template does not allow a conversation to start with a '", roles_[r], "' message");
      throw_error("the chat template does not allow a '", roles_[r], "' message after a '", roles_[prev], "' message");
    }
    out += *sep;
    if (!json::is_valid_utf8(messages[k].content)) throw_error("message ", k, " content is not valid UTF-8");
    if (trim_[r]) out += python_strip(messages[k].content);
    else out += messages[k].content;
    prev = r;
  }
  const std::optional<std::string>& tail = add_generation_prompt ? end_gen_[prev] : end_nogen_[prev];
  if (!tail)
    throw_error("the chat template does not allow a conversation to end with a '", roles_[prev], "' message",
                add_generation_prompt ? " and a generation prompt" : "");
  out += *tail;
  return out;
}

}  // namespace afs
