// afs error type and overflow-safe size arithmetic shared by every part of the runtime.
//
// Every failure that a user can cause (bad file, bad request, bad argument) is reported by throwing
// afs::Error with a sentence that names what is wrong; the binary and the bindings turn it into a
// message and a non-zero exit / a Python exception. Nothing user-reachable aborts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace afs {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Builds a message from stream-able parts: throw_error("tensor ", name, " has ", n, " bytes").
template <class... Parts>
[[noreturn]] inline void throw_error(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

// a + b and a * b on sizes, failing instead of wrapping.
inline bool add_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }
inline bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

inline uint64_t checked_add(uint64_t a, uint64_t b, const char* what) {
  uint64_t r;
  if (add_overflows(a, b, &r)) throw_error(what, ": size overflow (", a, " + ", b, ")");
  return r;
}
inline uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  uint64_t r;
  if (mul_overflows(a, b, &r)) throw_error(what, ": size overflow (", a, " * ", b, ")");
  return r;
}

}  // namespace afs
