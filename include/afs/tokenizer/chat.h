// Applies a chat template that afs_build/chat_template.py compiled at build time (no Jinja at run time).
//
// The compiled form ("afs-chat-v1", the manifest's "chat_template" section) is a transition table:
//   text = start[r1] + c1 + between[r1][r2] + c2 + ... + cN + end[rN][gen]
// where ri is message i's role, ci its content (stripped of Python-whitespace when trim[ri] is set)
// and gen says whether a generation prompt is wanted. A null entry means the template rejects that
// role order (e.g. two user turns in a row); apply() then throws afs::Error naming the roles.
// The builder verified the table against Jinja renders of many conversations before accepting it.
// The result is tokenized with add_special_tokens=false, as transformers' apply_chat_template does.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace afs {

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  static ChatTemplate from_json(std::string_view compiled_json);

  std::string apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  const std::vector<std::string>& roles() const { return roles_; }

 private:
  size_t role_index(const std::string& role) const;

  std::vector<std::string> roles_;
  std::vector<bool> trim_;                                      // [role]
  std::vector<std::optional<std::string>> start_;               // [role]
  std::vector<std::optional<std::string>> between_;             // [from * n + to]
  std::vector<std::optional<std::string>> end_nogen_, end_gen_;  // [role]
};

}  // namespace afs
