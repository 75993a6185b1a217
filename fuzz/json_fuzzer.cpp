// libFuzzer harness for the strict JSON reader (include/afs/json.h), which reads every manifest,
// tokenizer.json and chat request. Accepted documents must survive a dump/parse round trip.
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "afs/error.h"
#include "afs/json.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  afs::json::Value v;
  try {
    v = afs::json::parse(text);
  } catch (const afs::Error&) {
    return 0;
  }
  // Strings and keys of an accepted document are valid UTF-8, so dumping them is valid JSON.
  const std::string once = afs::json::dump(v);
  afs::json::Value again;
  try {
    again = afs::json::parse(once);
  } catch (const afs::Error& e) {
    std::fprintf(stderr, "re-parse of dumped JSON failed: %s\n", e.what());
    AFS_FUZZ_CHECK(false);
  }
  AFS_FUZZ_CHECK(afs::json::dump(again) == once);
  // Look-ups and typed accessors on arbitrary documents either answer or throw afs::Error.
  try {
    if (v.is_object()) {
      for (const auto& kv : v.as_object()) (void)v.at(kv.first);
      (void)v.find("tensors");
    } else if (v.is_array()) {
      for (const auto& e : v.as_array()) (void)e.type();
    }
    (void)v.as_int("value");
  } catch (const afs::Error&) {
  }
  return 0;
}
