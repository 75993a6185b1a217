"""Reading safetensors checkpoints without loading them.

We parse the safetensors format ourselves rather than through the safetensors package: its numpy
backend has no bfloat16, and we want every header field checked (header size, offsets within the
file, no overlap, known dtype, element count matching the byte range) before a single byte of tensor
data is trusted. Tensor data is then streamed in bounded chunks with pread, so packing a 7B model
never holds more than a chunk of it in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> (bytes per element, numpy dtype used to hold the raw bits)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "F64": (8, np.dtype("<f8")),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key given twice is an error (json.loads would keep the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and duplicate keys are ValueErrors
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        if offs[1] > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} data_offsets {offs} run past the end of the data "
                f"({data_len} bytes): the file is truncated or corrupt"
            )
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype][0]
        if nbytes != offs[1] - offs[0]:
            raise CheckpointError(
                f"{path}: tensor {name!r} shape {shape} {dtype} needs {nbytes} bytes but data_offsets cover {offs[1] - offs[0]}"
            )
        spans.append((offs[0], offs[1], name))
        out[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], nbytes)
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0 and a1 > a0:
            raise CheckpointError(f"{path}: tensors {an!r} and {bn!r} overlap in the data section")
    return out


def find_shards(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from model.safetensors.index.json when present."""
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object") from None
        files = []
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
                raise CheckpointError(f"{index}: weight_map entry for {name!r} names an invalid file {fname!r}")
            if fname not in files:
                files.append(fname)
        paths = [checkpoint / f for f in files]
        for p in paths:
            if not p.exists():
                raise CheckpointError(f"{index}: shard {p.name} is listed but missing from {checkpoint}")
        return paths
    paths = sorted(checkpoint.glob("*.safetensors"))
    if not paths:
        if list(checkpoint.glob("*.bin")) or list(checkpoint.glob("*.pt")):
            raise CheckpointError(
                f"{checkpoint}: only PyTorch .bin weights found; afs reads safetensors "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise CheckpointError(f"{checkpoint}: no *.safetensors files found")
    return paths


def read_checkpoint_tensors(checkpoint: Path) -> dict[str, TensorInfo]:
    """All tensors of all shards; a name in two shards is an error."""
    tensors: dict[str, TensorInfo] = {}
    for shard in find_shards(checkpoint):
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file.name} and {shard.name}")
            tensors[name] = info
    return tensors


def read_rows(info: TensorInfo, row0: int, row1: int) -> np.ndarray:
    """Rows [row0, row1) of a tensor (first dimension), as float32. Reads only those bytes."""
    cols = info.numel // info.shape[0] if info.shape and info.shape[0] else 0
    esize, raw_dtype = DTYPES[info.dtype]
    start = info.offset + row0 * cols * esize
    count = (row1 - row0) * cols
    buf = np.empty(count, dtype=raw_dtype)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading tensor {info.name!r}")
            done += got
    finally:
        os.close(fd)
    if info.dtype == "BF16":
        return (buf.astype(np.uint32) << 16).view(np.float32)
    return buf.astype(np.float32, copy=False)
