// Stop-string matching over streamed text (see include/afs/stop_strings.h).
#include "afs/stop_strings.h"

#include <algorithm>

#include "afs/error.h"

namespace afs {

StopStrings::StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const auto& s : stops_)
    if (s.empty()) throw_error("stop strings must not be empty");
}

std::string StopStrings::push(std::string_view text) {
  if (stopped_) return {};
  pending_ += text;
  size_t cut = std::string::npos;
  for (const auto& s : stops_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    stopped_ = true;
    return out;
  }
  // Keep back the longest tail that could still grow into a stop string; never split UTF-8.
  size_t keep = 0;
  for (const auto& s : stops_)
    for (size_t k = std::min(s.size() - 1, pending_.size()); k > keep; --k)
      if (pending_.compare(pending_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  size_t n = pending_.size() - keep;
  while (n > 0 && n < pending_.size() && (static_cast<unsigned char>(pending_[n]) & 0xC0) == 0x80) --n;
  std::string out = pending_.substr(0, n);
  pending_.erase(0, n);
  return out;
}

std::string StopStrings::finish() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace afs
