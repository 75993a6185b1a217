// libFuzzer harness for the model.afs reader (afs::EngineFile::open) and the manifest reads that
// Engine::load does after it (generation defaults, packed tokenizer, chat template).
//
// The first input byte picks how the rest becomes a file, so the fuzzer is not stuck behind the
// CRC-32 checks:
//   mode % 3 == 0  the bytes as they are;
//   mode % 3 == 1  the bytes with both header checksums recomputed (when the header is there);
//   mode % 3 == 2  the bytes are a manifest: a valid header is written for it, followed by
//                  (mode / 3) % 16 pages of tensor data.
// The file lives in a memfd and is opened through /proc/self/fd, so the real open/mmap path runs.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "afs/engine_file.h"
#include "afs/error.h"
#include "afs/json.h"
#include "afs/tokenizer/chat.h"
#include "afs/tokenizer/tokenizer.h"
#include "fuzz_common.h"

namespace {

void put_u32(std::vector<uint8_t>& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }
void put_u64(std::vector<uint8_t>& b, size_t at, uint64_t v) { std::memcpy(b.data() + at, &v, 8); }
uint64_t get_u64(const std::vector<uint8_t>& b, size_t at) {
  uint64_t v;
  std::memcpy(&v, b.data() + at, 8);
  return v;
}

std::vector<uint8_t> make_file(const uint8_t* data, size_t size) {
  const uint8_t mode = size ? data[0] : 0;
  std::vector<uint8_t> file(data + (size ? 1 : 0), data + size);
  if (mode % 3 == 1 && file.size() >= afs::kEngineHeaderBytes) {
    const uint64_t m_off = get_u64(file, 16), m_len = get_u64(file, 24);
    if (m_off <= file.size() && m_len <= file.size() - m_off) put_u32(file, 48, afs::crc32(file.data() + m_off, m_len));
    put_u32(file, 52, afs::crc32(file.data(), 52));
  } else if (mode % 3 == 2) {
    const size_t pages = (mode / 3) % 16;
    const size_t m_len = file.size();
    const size_t d_off = (afs::kEngineHeaderBytes + m_len + afs::kEngineAlign - 1) / afs::kEngineAlign * afs::kEngineAlign;
    std::vector<uint8_t> out(d_off + pages * afs::kEngineAlign, 0);
    if (m_len) std::memcpy(out.data() + afs::kEngineHeaderBytes, file.data(), m_len);
    for (size_t i = d_off; i < out.size(); ++i) out[i] = static_cast<uint8_t>(i * 31);
    std::memcpy(out.data(), afs::kEngineMagic, 8);
    put_u32(out, 8, afs::kEngineFormatVersion);
    put_u64(out, 16, afs::kEngineHeaderBytes);
    put_u64(out, 24, m_len);
    put_u64(out, 32, d_off);
    put_u64(out, 40, out.size());
    put_u32(out, 48, afs::crc32(out.data() + afs::kEngineHeaderBytes, m_len));
    put_u32(out, 52, afs::crc32(out.data(), 52));
    file = std::move(out);
  }
  return file;
}

// What Engine::load reads from the manifest once the file is open.
void read_manifest_sections(const afs::EngineFile& f) {
  const afs::json::Value& m = f.manifest();
  if (const afs::json::Value* g = m.find("generation"))
    if (const afs::json::Value* eos = g->find("eos_token_ids"))
      for (const auto& v : eos->as_array("generation.eos_token_ids")) (void)v.as_int("eos token id");
  if (const afs::TensorEntry* blob = f.find("tokenizer.json")) {
    const afs::json::Value* opts = m.find("tokenizer");
    if (blob->dtype != afs::DType::U8 || !opts || !opts->is_object()) return;
    std::string_view text(reinterpret_cast<const char*>(blob->data), blob->bytes);
    afs::Tokenizer tok = afs::Tokenizer::from_json(text, afs::json::dump(*opts));
    (void)tok.encode("Hello world", true);
    if (const afs::json::Value* chat = m.find("chat_template"); chat && !chat->is_null())
      (void)afs::ChatTemplate::from_json(afs::json::dump(*chat));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> file = make_file(data, size);
  const int fd = memfd_create("afs-fuzz", MFD_CLOEXEC);
  AFS_FUZZ_CHECK(fd >= 0);
  size_t done = 0;
  while (done < file.size()) {
    const ssize_t n = write(fd, file.data() + done, file.size() - done);
    AFS_FUZZ_CHECK(n > 0);
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    auto f = afs::EngineFile::open(path);
    AFS_FUZZ_CHECK(f->file_bytes() == file.size());
    uint64_t total = 0;
    for (const auto& t : f->tensors()) {
      AFS_FUZZ_CHECK(t.bytes == static_cast<uint64_t>(t.numel()) * afs::dtype_bytes(t.dtype));
      AFS_FUZZ_CHECK(t.offset + t.bytes <= file.size());
      total += t.bytes;
      AFS_FUZZ_CHECK(&f->expect(t.name, t.dtype, t.shape) == f->find(t.name));
      std::vector<int64_t> other = t.shape;
      other.push_back(1);
      try {
        f->expect(t.name, t.dtype, other);
        AFS_FUZZ_CHECK(false);
      } catch (const afs::Error&) {
      }
    }
    AFS_FUZZ_CHECK(total <= file.size());  // tensors never overlap, so they fit in the file
    f->verify([](const afs::TensorEntry&, uint32_t) {});  // reads every tensor byte
    read_manifest_sections(*f);
  } catch (const afs::Error&) {
    // A clear refusal is the expected outcome for most inputs.
  }
  close(fd);
  return 0;
}
