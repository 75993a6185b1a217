// libFuzzer harness for the engine's view of packed tokenizer data: tokenizer.json as the
// Tokenizer constructor reads it (from model.afs, so hostile), the manifest's tokenizer options and
// the compiled chat template. Each must build or throw afs::Error; a tokenizer that builds must
// then encode and decode.
//
// Input: the fuzzed text is used three ways: as tokenizer.json (default options), as the options
// JSON (with a small fixed tokenizer.json, small_tokenizer.json) and as a compiled chat template.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "afs/error.h"
#include "afs/json.h"
#include "afs/tokenizer/chat.h"
#include "afs/tokenizer/tokenizer.h"
#include "fuzz_common.h"

namespace {
const std::string* g_small_json = nullptr;

void exercise(const afs::Tokenizer& tok) {
  for (const char* s : {"Hello, world!", " <|endoftext|> naïve 日本語 😀\n\n  x", ""}) {
    const std::vector<int32_t> ids = tok.encode(s, true);
    for (int32_t id : ids) AFS_FUZZ_CHECK(id >= 0);
    const std::string text = tok.decode(ids);
    AFS_FUZZ_CHECK(afs::json::is_valid_utf8(text));
  }
  std::vector<int32_t> ids;
  for (int32_t i = -2; i < 300; ++i) ids.push_back(i);
  afs::StreamDecoder dec(tok);
  std::string streamed;
  for (int32_t id : ids) streamed += dec.step(id);
  streamed += dec.flush();
  AFS_FUZZ_CHECK(streamed == tok.decode(ids));
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const std::string small = afs_fuzz::read_data_file("small_tokenizer.json");
  g_small_json = &small;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    exercise(afs::Tokenizer::from_json(text, ""));
  } catch (const afs::Error&) {
  }
  try {
    exercise(afs::Tokenizer(*g_small_json, afs::TokenizerOptions::from_json(text)));
  } catch (const afs::Error&) {
  }
  try {
    const afs::ChatTemplate chat = afs::ChatTemplate::from_json(text);
    for (const auto& role : chat.roles()) {
      try {
        (void)chat.apply({{role, "content"}}, true);
        (void)chat.apply({{role, "a"}, {role, " b "}}, false);
      } catch (const afs::Error&) {
      }
    }
  } catch (const afs::Error&) {
  }
  return 0;
}
