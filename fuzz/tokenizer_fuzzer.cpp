// libFuzzer harness for the byte-level BPE tokenizer with the demo model's tokenizer.json (fixed):
// encode, decode, the streaming decoder and the chat template applier on arbitrary input.
//
// Input: one flags byte, then the payload.
//   flags & 1   add_special_tokens for encode
//   flags & 2   skip_special_tokens for decode
//   flags & 4   the payload is also read as little-endian int32 token ids (any value) to decode
// Invariants checked: valid UTF-8 text round-trips through encode/decode (the demo tokenizer has no
// normalizer and no stripping added tokens); invalid UTF-8 is refused with afs::Error; the
// concatenated streaming decode equals decode, and every piece it returns is valid UTF-8.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "afs/error.h"
#include "afs/json.h"
#include "afs/tokenizer/chat.h"
#include "afs/tokenizer/tokenizer.h"
#include "fuzz_common.h"

namespace {

const afs::Tokenizer* g_tok = nullptr;
const afs::ChatTemplate* g_chat = nullptr;

std::string stream_decode(const std::vector<int32_t>& ids, bool skip) {
  afs::StreamDecoder dec(*g_tok, skip);
  std::string out;
  for (int32_t id : ids) {
    const std::string piece = dec.step(id);
    AFS_FUZZ_CHECK(afs::json::is_valid_utf8(piece));
    out += piece;
  }
  const std::string tail = dec.flush();
  AFS_FUZZ_CHECK(afs::json::is_valid_utf8(tail));
  return out + tail;
}

void check_decode(const std::vector<int32_t>& ids, bool skip) {
  const std::string text = g_tok->decode(ids, skip);
  AFS_FUZZ_CHECK(afs::json::is_valid_utf8(text));
  AFS_FUZZ_CHECK(stream_decode(ids, skip) == text);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static afs::Tokenizer tok =
      afs::Tokenizer::from_json(afs_fuzz::read_data_file("tokenizer.json"), afs_fuzz::read_data_file("options.json"));
  static afs::ChatTemplate chat = afs::ChatTemplate::from_json(afs_fuzz::read_data_file("chat.json"));
  g_tok = &tok;
  g_chat = &chat;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  const bool add_special = flags & 1, skip_special = flags & 2;

  if (afs::json::is_valid_utf8(text)) {
    const std::vector<int32_t> ids = g_tok->encode(text, add_special);
    for (int32_t id : ids) AFS_FUZZ_CHECK(id >= 0 && static_cast<size_t>(id) < g_tok->id_space());
    AFS_FUZZ_CHECK(g_tok->decode(g_tok->encode(text, false)) == text);
    check_decode(ids, skip_special);
    (void)g_tok->pre_tokenize(text);
    (void)g_tok->token_to_id(text);
    // The chat path: the text as a user turn after a system turn.
    try {
      const std::string prompt = g_chat->apply({{"system", "s"}, {"user", std::string(text)}}, true);
      (void)g_tok->encode(prompt, false);
    } catch (const afs::Error&) {
      AFS_FUZZ_CHECK(false);  // that role order is valid for the demo template
    }
  } else {
    try {
      (void)g_tok->encode(text, add_special);
      AFS_FUZZ_CHECK(false);  // invalid UTF-8 must be refused
    } catch (const afs::Error&) {
    }
  }

  if (flags & 4) {
    std::vector<int32_t> ids((size - 1) / 4);
    if (!ids.empty()) std::memcpy(ids.data(), data + 1, ids.size() * 4);
    check_decode(ids, skip_special);
    for (int32_t id : ids) (void)g_tok->id_to_token(id);
  }
  return 0;
}
