// model.afs reader: header and manifest validation, tensor table checks, the data mapping and its
// private copy, CRC-32.
#include "afs/engine_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <unordered_set>

#include "afs/error.h"

namespace afs {

namespace {

// Slicing-by-8 CRC-32 (IEEE 802.3, the polynomial zlib uses), tables built once.
struct Crc32Tables {
  uint32_t t[8][256];
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const Crc32Tables& crc_tables() {
  static const Crc32Tables tables;
  return tables;
}

uint32_t read_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t read_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

DType parse_dtype(const std::string& s, const std::string& tensor) {
  if (s == "f32") return DType::F32;
  if (s == "bf16") return DType::BF16;
  if (s == "f16") return DType::F16;
  if (s == "u8") return DType::U8;
  throw_error("tensor '", tensor, "' has unknown dtype '", s, "'");
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

}  // namespace

uint32_t crc32(const void* data, size_t n, uint32_t prev) {
  const auto& T = crc_tables().t;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~prev;
  while (n >= 8) {
    uint32_t lo = read_u32(p) ^ c;
    uint32_t hi = read_u32(p + 4);
    c = T[7][lo & 0xFF] ^ T[6][(lo >> 8) & 0xFF] ^ T[5][(lo >> 16) & 0xFF] ^ T[4][lo >> 24] ^
        T[3][hi & 0xFF] ^ T[2][(hi >> 8) & 0xFF] ^ T[1][(hi >> 16) & 0xFF] ^ T[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = T[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

std::string TensorEntry::describe() const { return std::string(dtype_name(dtype)) + " " + shape_str(shape); }

std::unique_ptr<EngineFile> EngineFile::open(const std::string& path) {
  std::unique_ptr<EngineFile> f(new EngineFile());
  f->path_ = path;
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f->fd_ < 0) throw_error(path, ": cannot open engine file: ", std::strerror(errno));
  struct stat st;
  if (fstat(f->fd_, &st) != 0) throw_error(path, ": cannot stat engine file: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw_error(path, ": not a regular file");
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ < kEngineHeaderBytes)
    throw_error(path, ": truncated engine file (", f->size_, " bytes; the header alone is ", kEngineHeaderBytes, ")");
  try {
    f->parse();
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  f->map_ = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, f->fd_, 0);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    throw_error(path, ": cannot map engine file: ", std::strerror(errno));
  }
  const uint8_t* data = static_cast<const uint8_t*>(f->map_) + f->data_offset_;
  for (auto& e : f->tensors_) e.data = data + e.offset;
  // Host-side blobs are read into memory now: nothing may read the mapping after the engine loads.
  for (const auto& e : f->tensors_)
    if (e.dtype == DType::U8 && e.bytes) f->copy_pages_to_memory(f->data_offset_ + e.offset, f->data_offset_ + e.offset + e.bytes);
  return f;
}

EngineFile::~EngineFile() {
  if (map_) munmap(map_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void EngineFile::read_at(uint64_t offset, void* dst, uint64_t n) const {
  uint8_t* p = static_cast<uint8_t*>(dst);
  while (n) {
    const ssize_t got = ::pread(fd_, p, std::min<uint64_t>(n, 1ull << 30), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw_error("cannot read engine file: ", std::strerror(errno));
    if (got == 0)
      throw_error("engine file ends at byte ", offset, " but was ", size_, " bytes when opened (truncated while in use)");
    p += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<uint64_t>(got);
  }
}

void EngineFile::copy_pages_to_memory(uint64_t begin, uint64_t end) const {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  begin = begin / page * page;
  end = std::min((end + page - 1) / page * page, (size_ + page - 1) / page * page);
  if (begin >= end) return;
  uint8_t* p = static_cast<uint8_t*>(map_) + begin;
  const size_t len = end - begin;
  // NOTE: MAP_FIXED swaps the file pages for zeroed anonymous ones at the same address in one step;
  // if it fails the range may be unmapped, so the error must end this EngineFile's use.
  if (mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
    throw_error(path_, ": cannot allocate ", len, " bytes for the engine file's contents: ", std::strerror(errno));
  try {
    read_at(begin, p, std::min<uint64_t>(end, size_) - begin);
  } catch (const Error& e) {
    throw Error(path_ + ": " + e.what());
  }
  mprotect(p, len, PROT_READ);
}

void EngineFile::read_into_memory() const {
  if (in_memory_) return;
  copy_pages_to_memory(data_offset_, size_);
  in_memory_ = true;
}

void EngineFile::parse() {
  uint8_t header[kEngineHeaderBytes];
  read_at(0, header, kEngineHeaderBytes);
  if (std::memcmp(header, kEngineMagic, 8) != 0) throw_error("not an afs engine file (bad magic)");
  const uint32_t version = read_u32(header + 8);
  if (version != kEngineFormatVersion)
    throw_error("engine file format version ", version, ", this runtime reads version ", kEngineFormatVersion,
                "; rebuild the engine with afs-build");
  if (crc32(header, 52) != read_u32(header + 52)) throw_error("header checksum mismatch (corrupt file)");
  const uint64_t m_off = read_u64(header + 16), m_len = read_u64(header + 24);
  const uint64_t d_off = read_u64(header + 32), f_len = read_u64(header + 40);
  if (f_len != size_)
    throw_error("file is ", size_, " bytes but its header says ", f_len, " (truncated or corrupt)");
  if (m_off != kEngineHeaderBytes) throw_error("manifest offset ", m_off, " is invalid");
  if (m_len > kMaxManifestBytes) throw_error("manifest of ", m_len, " bytes exceeds the ", kMaxManifestBytes, "-byte limit");
  if (checked_add(m_off, m_len, "manifest end") > d_off || d_off > size_ || d_off % kEngineAlign)
    throw_error("data offset ", d_off, " is out of range");
  manifest_text_.resize(m_len);
  read_at(m_off, manifest_text_.data(), m_len);
  if (crc32(manifest_text_.data(), m_len) != read_u32(header + 48)) throw_error("manifest checksum mismatch (corrupt file)");
  data_offset_ = d_off;
  try {
    manifest_ = json::parse(manifest_text_);
  } catch (const Error& e) {
    throw_error("manifest: ", e.what());
  }
  if (!manifest_.is_object()) throw_error("manifest is not a JSON object");
  spec_hash_ = manifest_.at("spec_hash").as_string("manifest field 'spec_hash'");

  const uint64_t data_len = size_ - d_off;
  const auto& table = manifest_.at("tensors").as_array("manifest field 'tensors'");
  tensors_.reserve(table.size());
  std::unordered_set<std::string> names;
  for (const auto& t : table) {
    if (!t.is_object()) throw_error("manifest tensors[", tensors_.size(), "] is not an object");
    TensorEntry e;
    e.name = t.at("name").as_string("tensor name");
    if (!names.insert(e.name).second) throw_error("tensor '", e.name, "' appears twice in the manifest");
    e.dtype = parse_dtype(t.at("dtype").as_string("tensor dtype"), e.name);
    uint64_t numel = 1;
    bool too_many = false;
    for (const auto& d : t.at("shape").as_array("tensor shape")) {
      const int64_t v = d.as_int("tensor dimension");
      if (v < 0 || v > (int64_t(1) << 40)) throw_error("tensor '", e.name, "' has invalid dimension ", v);
      e.shape.push_back(v);
      too_many |= mul_overflows(numel, static_cast<uint64_t>(v), &numel);
    }
    if (too_many || numel > (uint64_t(1) << 62))
      throw_error("tensor '", e.name, "' has too many elements (shape ", shape_str(e.shape), ")");
    e.layout = t.at("layout").as_string("tensor layout");
    const int64_t off = t.at("offset").as_int("tensor offset"), nbytes = t.at("bytes").as_int("tensor bytes");
    if (off < 0 || nbytes < 0) throw_error("tensor '", e.name, "' has a negative offset or size");
    e.offset = static_cast<uint64_t>(off);
    e.bytes = static_cast<uint64_t>(nbytes);
    if (e.offset % kEngineAlign) throw_error("tensor '", e.name, "' offset ", e.offset, " is not 4096-aligned");
    if (checked_mul(numel, dtype_bytes(e.dtype), "tensor size") != e.bytes)
      throw_error("tensor '", e.name, "' is ", e.describe(), " but claims ", e.bytes, " bytes");
    if (checked_add(e.offset, e.bytes, "tensor end") > data_len)
      throw_error("tensor '", e.name, "' (offset ", e.offset, ", ", e.bytes, " bytes) runs past the end of the file");
    const std::string& crc = t.at("crc32").as_string("tensor crc32");
    if (crc.size() != 8 || crc.find_first_not_of("0123456789abcdef") != std::string::npos)
      throw_error("tensor '", e.name, "' has an invalid crc32 field");
    e.crc32 = static_cast<uint32_t>(std::stoul(crc, nullptr, 16));
    tensors_.push_back(std::move(e));
  }
  std::vector<const TensorEntry*> by_off;
  for (const auto& e : tensors_) by_off.push_back(&e);
  std::sort(by_off.begin(), by_off.end(), [](auto a, auto b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_off.size(); ++i) {
    const auto* a = by_off[i - 1];
    const auto* b = by_off[i];
    if (a->bytes && b->bytes && a->offset + a->bytes > b->offset)
      throw_error("tensors '", a->name, "' and '", b->name, "' overlap");
  }
}

const TensorEntry* EngineFile::find(std::string_view name) const {
  for (const auto& e : tensors_)
    if (e.name == name) return &e;
  return nullptr;
}

const TensorEntry& EngineFile::expect(std::string_view name, DType dtype, const std::vector<int64_t>& shape) const {
  const TensorEntry* e = find(name);
  if (!e) throw_error(path_, ": engine file has no tensor '", name, "'");
  if (e->dtype != dtype || e->shape != shape)
    throw_error(path_, ": tensor '", name, "' is ", e->describe(), " but this engine was compiled for ",
                dtype_name(dtype), " ", shape_str(shape));
  return *e;
}

size_t EngineFile::verify(const std::function<void(const TensorEntry&, uint32_t)>& bad,
                          const std::function<void(uint64_t, uint64_t)>& progress) const {
  uint64_t total = 0, done = 0;
  for (const auto& e : tensors_) total += e.bytes;
  size_t n_bad = 0;
  constexpr uint64_t kStep = 16ull << 20;
  std::vector<uint8_t> buf(std::min(kStep, total));
  for (const auto& e : tensors_) {
    uint32_t c = 0;
    for (uint64_t o = 0; o < e.bytes; o += kStep) {
      const uint64_t n = std::min(kStep, e.bytes - o);
      try {
        read_at(data_offset_ + e.offset + o, buf.data(), n);
      } catch (const Error& err) {
        throw Error(path_ + ": " + err.what());
      }
      c = crc32(buf.data(), n, c);
      done += n;
      if (progress) progress(done, total);
    }
    if (c != e.crc32) {
      ++n_bad;
      if (bad) bad(e, c);
    }
  }
  return n_bad;
}

}  // namespace afs
