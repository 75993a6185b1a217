"""pack stage: stream checkpoint tensors into model.afs.

Tensors are read in bounded row chunks, converted (fused, cast to the engine dtype, checked for
NaN/Inf), checksummed and written at their final 4096-aligned offsets, so peak memory stays at a
few chunks whatever the model size. The file is written under a temporary name and renamed into
place only when complete.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .checkpoint import TensorInfo, read_rows
from .engine_format import DTYPE_BYTES, HEADER_BYTES, align_up, manifest_bytes, pack_header
from .errors import CheckpointError
from .weights import EngineTensor

CHUNK_ELEMENTS = 8 * 1024 * 1024  # 32 MB of float32 per chunk

ENGINE_DTYPES = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def convert(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return x.astype("<f4", copy=False)
    if dtype == "bf16":
        return to_bf16_bits(x)
    if dtype == "f16":
        with np.errstate(over="ignore"):
            return x.astype("<f2")
    raise ValueError(dtype)


@dataclass
class PackedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    layout: str = "row_major"
    crc32: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "layout": self.layout,
            "offset": self.offset,
            "bytes": self.nbytes,
            "crc32": f"{self.crc32:08x}",
        }


def _layout(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[PackedTensor], int]:
    out, off = [], 0
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        out.append(PackedTensor(name, dtype, shape, off, n))
        off = align_up(off + n)
    return out, off


def pack_model(
    path: Path,
    table: list[EngineTensor],
    sources: dict[str, TensorInfo],
    dtype: str,
    manifest: dict[str, Any],
    blobs: dict[str, bytes] | None = None,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write model.afs at `path`. Returns the manifest as written."""
    edtype = ENGINE_DTYPES[dtype]
    blobs = blobs or {}
    plan = [(t.name, edtype if t.kind == "matrix" else "f32", t.shape) for t in table]
    plan += [(name, "u8", (len(data),)) for name, data in blobs.items()]
    packed, data_bytes = _layout(plan)

    manifest = dict(manifest)
    manifest["tensors"] = [p.to_json() for p in packed]
    # The manifest length does not depend on the checksums (fixed-width hex), so the data offset
    # can be fixed before any tensor is written.
    data_offset = align_up(HEADER_BYTES + len(manifest_bytes(manifest)))
    file_bytes = data_offset + data_bytes

    tmp = path.with_name(path.name + ".partial")
    total = sum(p.nbytes for p in packed)
    done = 0
    with open(tmp, "wb") as f:
        f.truncate(file_bytes)
        for pt, et in zip(packed, table):
            crc = 0
            f.seek(data_offset + pt.offset)
            for src_name in et.sources:
                info = sources[src_name]
                rows = info.shape[0]
                cols = info.numel // rows if rows else 0
                step = max(1, CHUNK_ELEMENTS // max(cols, 1))
                for r0 in range(0, rows, step):
                    x = read_rows(info, r0, min(rows, r0 + step))
                    if not np.isfinite(x).all():
                        bad = int(np.count_nonzero(~np.isfinite(x)))
                        msg = f"tensor {src_name!r} ({info.file.name}) contains {bad} NaN/Inf values in rows {r0}..{min(rows, r0 + step) - 1}"
                        if not allow_nonfinite:
                            raise CheckpointError(msg + " (pass --allow-nonfinite to pack it anyway)")
                        if warn:
                            warn(msg)
                    data = convert(x, pt.dtype).tobytes()
                    crc = zlib.crc32(data, crc)
                    f.write(data)
                    done += len(data)
                    if progress:
                        progress(done, total)
            pt.crc32 = crc
        for pt in packed[len(table):]:
            data = blobs[pt.name]
            f.seek(data_offset + pt.offset)
            f.write(data)
            pt.crc32 = zlib.crc32(data)
            done += len(data)
            if progress:
                progress(done, total)
        manifest["tensors"] = [p.to_json() for p in packed]
        raw = manifest_bytes(manifest)
        assert HEADER_BYTES + len(raw) <= data_offset
        f.seek(0)
        f.write(pack_header(raw, data_offset, file_bytes))
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def base_manifest(engine_spec: dict[str, Any], spec_hash: str, source: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "afs-engine",
        "afs_version": __version__,
        "spec_hash": spec_hash,
        "engine_spec": engine_spec,
        "source": source,
        "generation": generation,
    }
