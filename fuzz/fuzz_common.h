// Shared bits of the libFuzzer harnesses: where the fixed data files live, and a check that
// aborts (so libFuzzer records the input) when an invariant of the code under test breaks.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace afs_fuzz {

// Data files (the demo tokenizer, its options and compiled chat template) are written by
// fuzz/run.sh into $AFS_FUZZ_DATA (default: the directory the fuzzer binary runs from).
inline std::string read_data_file(const char* name) {
  const char* dir = std::getenv("AFS_FUZZ_DATA");
  std::string path = std::string(dir && *dir ? dir : ".") + "/" + name;
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "fuzz: cannot read %s (run fuzz/run.sh, or set AFS_FUZZ_DATA)\n", path.c_str());
    std::exit(2);
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

#define AFS_FUZZ_CHECK(cond)                                                              \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "fuzz invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

}  // namespace afs_fuzz
