// Reader of model.afs (format: afs_build/engine_format.py). open() reads the header and manifest
// with pread and validates the header, the manifest checksum and every entry of the tensor table
// against the file size (overflow-safe) before anything is used; verify() additionally checks every
// tensor's CRC-32, reading the file.
//
// Tensor data is mmap'd read-only and tensors are views into the mapping. NOTE: a file mapping
// raises SIGBUS on access once the file is truncated under it, so mapped bytes are read only while
// an engine loads. Host-side blobs (u8 tensors: the packed tokenizer) are read into private memory
// at open; the CPU backend calls read_into_memory() for the weights, which it reads on every step.
// The CUDA backend copies the weights to the device at load and then leaves the mapping alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "afs/json.h"
#include "afs/types.h"

namespace afs {

inline constexpr char kEngineMagic[8] = {'A', 'F', 'S', 'M', 'O', 'D', 'E', 'L'};
inline constexpr uint32_t kEngineFormatVersion = 1;
inline constexpr uint64_t kEngineHeaderBytes = 64;
inline constexpr uint64_t kEngineAlign = 4096;
// NOTE: a real manifest is ~100 KB for a 64-layer model; the cap bounds what a hostile file can
// make the JSON reader allocate (each JSON value costs ~100 bytes in memory).
inline constexpr uint64_t kMaxManifestBytes = 16ull * 1024 * 1024;

uint32_t crc32(const void* data, size_t n, uint32_t prev = 0);

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::string layout;
  uint64_t offset = 0;  // relative to the data section
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
  const uint8_t* data = nullptr;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  std::string describe() const;  // "bf16 [384, 256]"
};

class EngineFile {
 public:
  // Maps and validates `path`. Throws afs::Error naming the file and the problem.
  static std::unique_ptr<EngineFile> open(const std::string& path);
  ~EngineFile();
  EngineFile(const EngineFile&) = delete;
  EngineFile& operator=(const EngineFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_bytes() const { return size_; }
  const json::Value& manifest() const { return manifest_; }
  const std::string& manifest_text() const { return manifest_text_; }
  const std::string& spec_hash() const { return spec_hash_; }
  const std::vector<TensorEntry>& tensors() const { return tensors_; }

  const TensorEntry* find(std::string_view name) const;
  // The tensor `name`, which must have this dtype and shape (else a clear error).
  const TensorEntry& expect(std::string_view name, DType dtype, const std::vector<int64_t>& shape) const;

  // Replaces the file-backed pages of the tensor data by private memory holding the same bytes at
  // the same addresses (read with pread, never through the mapping), so that truncating or
  // rewriting the file afterwards cannot reach this process. Costs the weights' size in anonymous
  // memory (not shared with other processes mapping the file). Call before any other thread reads
  // a tensor. Throws if the file shrank since open().
  void read_into_memory() const;

  // Checks every tensor's CRC-32 by reading the file; returns the number of bad tensors, reporting
  // each through `bad`. Throws if the file shrank since open().
  size_t verify(const std::function<void(const TensorEntry&, uint32_t actual)>& bad,
                const std::function<void(uint64_t done, uint64_t total)>& progress = {}) const;

 private:
  EngineFile() = default;
  void parse();
  // Reads n bytes at file offset `offset` into dst; throws if the file ends before.
  void read_at(uint64_t offset, void* dst, uint64_t n) const;
  // Replaces the mapped pages covering file bytes [begin, end) by private copies (see read_into_memory).
  void copy_pages_to_memory(uint64_t begin, uint64_t end) const;

  std::string path_;
  int fd_ = -1;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0;
  mutable bool in_memory_ = false;  // read_into_memory() ran
  std::string manifest_text_;
  json::Value manifest_;
  std::string spec_hash_;
  std::vector<TensorEntry> tensors_;
};

}  // namespace afs
