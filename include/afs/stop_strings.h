// Stop strings over streamed text. Generated text arrives piece by piece; a piece may end with the
// start of a stop string that the next piece completes, so that tail is held back until it is
// known not to be one. The text ends before the first stop string, which is not part of it
// (OpenAI's rule). Used by Engine::generate_text and, through the bindings, by afs-serve.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace afs {

class StopStrings {
 public:
  // Throws afs::Error for an empty stop string.
  explicit StopStrings(std::vector<std::string> stops);
  // Appends `text` (complete UTF-8 characters); returns the text that is now final, possibly "".
  // Once a stop string is found, stopped() is true and every later call returns "".
  std::string push(std::string_view text);
  // At the end of generation: the text still held back ("" after a stop).
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // text not yet returned: it might be the start of a stop string
  bool stopped_ = false;
};

}  // namespace afs
