"""model.afs: the engine file format (writer side; the C++ reader is include/afs/engine_file.h).

Layout (all integers little-endian):

    offset  size  field
    0       8     magic  b"AFSMODEL"
    8       4     format version (FORMAT_VERSION)
    12      4     flags (0)
    16      8     manifest offset (always 64)
    24      8     manifest length in bytes
    32      8     data offset (4096-aligned, after the manifest)
    40      8     file length in bytes
    48      4     CRC-32 of the manifest bytes
    52      4     CRC-32 of header bytes [0, 52)
    56      8     reserved (zero)
    64      ...   manifest: UTF-8 JSON
    data    ...   tensors, each starting on a 4096-byte boundary, offsets relative to the data offset

The manifest holds the afs version, the EngineSpec and its hash, the source checkpoint, the tensor
table (name, dtype, shape, layout, offset, bytes, crc32), the tokenizer section, the compiled chat
template and generation defaults.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

MAGIC = b"AFSMODEL"
FORMAT_VERSION = 1
HEADER_BYTES = 64
ALIGN = 4096
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # the reader's limit (include/afs/engine_file.h)
_HEADER = struct.Struct("<8sIIQQQQII8x")

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1}


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def pack_header(manifest: bytes, data_offset: int, file_bytes: int) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, HEADER_BYTES, len(manifest), data_offset, file_bytes,
                        zlib.crc32(manifest), 0)
    crc = zlib.crc32(head[:52])
    return head[:52] + struct.pack("<I", crc) + head[56:]


def read_manifest(path: Path) -> dict[str, Any]:
    """Header + manifest of a model.afs, validated (tensor data is not read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{path}: truncated engine file ({size} bytes, header needs {HEADER_BYTES})")
        magic, version, _flags, m_off, m_len, d_off, f_len, m_crc, h_crc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{path}: not an afs engine file (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: engine file format version {version}, this afs reads version {FORMAT_VERSION}")
        if zlib.crc32(head[:52]) != struct.unpack("<I", head[52:56])[0]:
            raise ValueError(f"{path}: engine file header checksum mismatch (corrupt file)")
        if f_len != size:
            raise ValueError(f"{path}: engine file is {size} bytes but its header says {f_len} (truncated or corrupt)")
        if m_off != HEADER_BYTES or m_len > MAX_MANIFEST_BYTES or m_off + m_len > d_off or d_off > size:
            raise ValueError(f"{path}: engine file manifest location is out of range")
        f.seek(m_off)
        raw = f.read(m_len)
    if zlib.crc32(raw) != m_crc:
        raise ValueError(f"{path}: engine manifest checksum mismatch (corrupt file)")
    return json.loads(raw.decode("utf-8"))


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=False, ensure_ascii=False).encode("utf-8")
