"""The malformed-input corpus: broken engine files and broken checkpoint files, each with the exact
error afs must give for it.

Every case is made from a valid input rather than stored, so it follows the format as it evolves:
  ENGINE_CASES      name -> fn(EngineImage) -> (model.afs bytes, message after "<model path>: ")
  CHECKPOINT_CASES  name -> (stage, fn(checkpoint dir) -> message); fn breaks the directory in place.
                    stage: "tensors" (read_checkpoint_tensors), "config" (load_config) or
                    "tokenizer" (load_tokenizer); every one is an afs-build error too.
tests/test_hostile_inputs.py asserts each message (binary, Python API, afs-build); under
tests/run_sanitized.sh it does so with ASan + UBSan builds of the engine binary and module.

To look at the files themselves, write them out from a built engine and a checkpoint:

    PYTHONPATH=python:. python tests/malformed/cases.py --engine engines/demo --checkpoint CKPT --out /tmp/malformed

which writes <out>/engine/<case>.afs, <out>/checkpoint/<case>/ and <out>/expected.json.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HEADER_BYTES = 64
ALIGN = 4096
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct("<8sIIQQQQII8x")


# ---------------------------------------------------------------------------------------------
# model.afs images


@dataclass
class EngineImage:
    """A valid model.afs, split into its parts (corruptions work on copies of these)."""

    raw: bytes
    manifest: dict
    manifest_raw: bytes
    d_off: int
    vocab: int

    @classmethod
    def read(cls, path: Path) -> "EngineImage":
        raw = path.read_bytes()
        _, _, _, _, m_len, d_off, _, _, _ = _HEADER.unpack_from(raw)
        manifest_raw = raw[HEADER_BYTES : HEADER_BYTES + m_len]
        manifest = json.loads(manifest_raw)
        vocab = manifest["engine_spec"]["model"]["vocab_size"]
        return cls(raw, manifest, manifest_raw, d_off, vocab)

    @property
    def data(self) -> bytes:
        return self.raw[self.d_off :]

    def tensor(self, name: str) -> dict:
        return next(t for t in self.manifest["tensors"] if t["name"] == name)

    def copy_manifest(self) -> dict:
        return json.loads(json.dumps(self.manifest))


def header(m_len: int, d_off: int, f_len: int, m_crc: int, *, magic: bytes = b"AFSMODEL", version: int = 1,
           m_off: int = HEADER_BYTES) -> bytes:
    """A 64-byte header with a correct header checksum, whatever the fields say."""
    head = _HEADER.pack(magic, version, 0, m_off, m_len, d_off, f_len, m_crc, 0)
    return head[:52] + struct.pack("<I", zlib.crc32(head[:52])) + head[56:]


def build(manifest: bytes | dict, data: bytes) -> bytes:
    """A well-formed file around any manifest bytes (valid checksums, data 4096-aligned)."""
    m = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=1).encode()
    d_off = (HEADER_BYTES + len(m) + ALIGN - 1) // ALIGN * ALIGN
    f_len = d_off + len(data)
    return header(len(m), d_off, f_len, zlib.crc32(m)) + m + b"\0" * (d_off - HEADER_BYTES - len(m)) + data


def with_table(img: EngineImage, mutate: Callable[[dict], None]) -> bytes:
    m = img.copy_manifest()
    mutate(m)
    return build(m, img.data)


def patch_header(img: EngineImage, **fields) -> bytes:
    """The file with some header fields replaced (header checksum recomputed)."""
    _, version, _, m_off, m_len, d_off, f_len, m_crc, _ = _HEADER.unpack_from(img.raw)
    vals = dict(version=version, m_off=m_off, m_len=m_len, d_off=d_off, f_len=f_len, m_crc=m_crc) | fields
    h = header(vals["m_len"], vals["d_off"], vals["f_len"], vals["m_crc"], version=vals["version"], m_off=vals["m_off"])
    return h + img.raw[HEADER_BYTES:]


def append_tensor(img: EngineImage, name: str, payload: bytes, dtype: str = "u8",
                  manifest_extra: dict | None = None) -> bytes:
    """The file with one more tensor at the end of the data (and manifest fields added)."""
    m = img.copy_manifest()
    m["tensors"] = [t for t in m["tensors"] if t["name"] != name]
    data = img.data + b"\0" * (-len(img.data) % ALIGN)
    m["tensors"].append({"name": name, "dtype": dtype, "shape": [len(payload)], "layout": "row_major",
                         "offset": len(data), "bytes": len(payload), "crc32": f"{zlib.crc32(payload):08x}"})
    m.update(manifest_extra or {})
    return build(m, data + payload)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _first_2d(img: EngineImage) -> dict:
    return next(t for t in img.manifest["tensors"] if len(t["shape"]) == 2)


def _two_weights(img: EngineImage) -> tuple[dict, dict]:
    ts = sorted((t for t in img.manifest["tensors"] if t["bytes"] >= ALIGN), key=lambda t: t["offset"])
    return ts[0], ts[1]


def _case_overlap(img: EngineImage):
    a, b = _two_weights(img)

    def mutate(m):
        for t in m["tensors"]:
            if t["name"] == b["name"]:
                t["offset"] = a["offset"] + ALIGN  # starts inside a
    return with_table(img, mutate), f"tensors '{a['name']}' and '{b['name']}' overlap"


def _case_dtype_vs_spec(img: EngineImage):
    t = _first_2d(img)
    rows, cols = t["shape"]
    if t["dtype"] == "f32":
        other, shape = "bf16", [rows, cols * 2]
    else:
        other, shape = "f32", [rows, cols // 2]
    return (with_table(img, lambda m: _set(m, t["name"], dtype=other, shape=shape)),
            f"tensor '{t['name']}' is {other} {_shape(shape)} but this engine was compiled for {t['dtype']} "
            f"{_shape(t['shape'])}")


def _case_shape_vs_spec(img: EngineImage):
    t = _first_2d(img)
    flat = [t["shape"][0] * t["shape"][1]]
    return (with_table(img, lambda m: _set(m, t["name"], shape=flat)),
            f"tensor '{t['name']}' is {t['dtype']} {_shape(flat)} but this engine was compiled for {t['dtype']} "
            f"{_shape(t['shape'])}")


def _set(m: dict, name: str, **kw) -> None:
    next(t for t in m["tensors"] if t["name"] == name).update(kw)


def _first(img: EngineImage) -> str:
    return img.manifest["tensors"][0]["name"]


TOKENIZER = "tokenizer.json"

ENGINE_CASES: dict[str, Callable[[EngineImage], tuple[bytes, str]]] = {
    # --- size and header
    "empty": lambda img: (b"", "truncated engine file (0 bytes; the header alone is 64)"),
    "header-63-bytes": lambda img: (img.raw[:63], "truncated engine file (63 bytes; the header alone is 64)"),
    "truncated-in-manifest": lambda img: (img.raw[:HEADER_BYTES + 10],
                                          f"file is 74 bytes but its header says {len(img.raw)} (truncated or corrupt)"),
    "truncated-in-data": lambda img: (img.raw[: len(img.raw) // 2 + 1],
                                      f"file is {len(img.raw) // 2 + 1} bytes but its header says {len(img.raw)} "
                                      "(truncated or corrupt)"),
    "wrong-magic": lambda img: (b"GGUF\3\0\0\0" + img.raw[8:], "not an afs engine file (bad magic)"),
    "version-0": lambda img: (patch_header(img, version=0),
                              "engine file format version 0, this runtime reads version 1; rebuild the engine with afs-build"),
    "version-max": lambda img: (patch_header(img, version=2**32 - 1),
                                "engine file format version 4294967295, this runtime reads version 1; rebuild the engine "
                                "with afs-build"),
    "header-checksum": lambda img: (img.raw[:20] + bytes([img.raw[20] ^ 1]) + img.raw[21:],
                                    "header checksum mismatch (corrupt file)"),
    "manifest-huge": lambda img: (patch_header(img, m_len=2**40),
                                  f"manifest of {2**40} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit"),
    "manifest-over-limit": lambda img: (patch_header(img, m_len=MAX_MANIFEST_BYTES + 1),
                                        f"manifest of {MAX_MANIFEST_BYTES + 1} bytes exceeds the "
                                        f"{MAX_MANIFEST_BYTES}-byte limit"),
    "manifest-length-max": lambda img: (patch_header(img, m_len=2**64 - 1),
                                        f"manifest of {2**64 - 1} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit"),
    "manifest-offset": lambda img: (patch_header(img, m_off=128), "manifest offset 128 is invalid"),
    "manifest-runs-into-data": lambda img: (patch_header(img, m_len=img.d_off), f"data offset {img.d_off} is out of range"),
    "data-offset-past-end": lambda img: (patch_header(img, d_off=len(img.raw) + ALIGN),
                                         f"data offset {len(img.raw) + ALIGN} is out of range"),
    "data-offset-max": lambda img: (patch_header(img, d_off=2**64 - 1), f"data offset {2**64 - 1} is out of range"),
    "data-offset-unaligned": lambda img: (patch_header(img, d_off=img.d_off + 8), f"data offset {img.d_off + 8} is out of range"),
    "manifest-checksum": lambda img: (patch_header(img, m_crc=zlib.crc32(b"something else")),
                                      "manifest checksum mismatch (corrupt file)"),
    # --- manifest JSON
    "manifest-not-utf8": lambda img: (build(b'{"spec_hash": "\xff\xfe"}', img.data),
                                      "manifest: invalid JSON at byte 15: invalid UTF-8 in string"),
    "manifest-nested": lambda img: (build(b'{"a": ' + b"[" * 100000, img.data),
                                    "manifest: invalid JSON at byte 134: nesting too deep"),
    "manifest-nan": lambda img: (build(b'{"spec_hash": NaN}', img.data),
                                 "manifest: invalid JSON at byte 14: unexpected character"),
    "manifest-trailing-garbage": lambda img: (build(b'{"spec_hash": "x"} {}', img.data),
                                              "manifest: invalid JSON at byte 19: unexpected trailing characters"),
    "manifest-array": lambda img: (build(b"[]", img.data), "manifest is not a JSON object"),
    "no-spec-hash": lambda img: (with_table(img, lambda m: m.pop("spec_hash")), "missing field 'spec_hash'"),
    # --- tensor table
    "tensors-not-array": lambda img: (with_table(img, lambda m: m.update(tensors={})),
                                      "manifest field 'tensors' must be an array"),
    "tensor-entry-not-object": lambda img: (with_table(img, lambda m: m["tensors"].insert(0, 7)),
                                            "manifest tensors[0] is not an object"),
    "tensor-name-not-string": lambda img: (with_table(img, lambda m: m["tensors"][0].update(name=None)),
                                           "tensor name must be a string"),
    "duplicate-tensor": lambda img: (with_table(img, lambda m: m["tensors"].append(dict(m["tensors"][0]))),
                                     f"tensor '{_first(img)}' appears twice in the manifest"),
    "overlapping-tensors": _case_overlap,
    "offset-float": lambda img: (with_table(img, lambda m: m["tensors"][0].update(offset=4096.5)),
                                 "tensor offset must be an integer"),
    "offset-beyond-int64": lambda img: (build(img.manifest_raw.replace(b'"offset": 0,', b'"offset": 99999999999999999999,', 1),
                                              img.data), "tensor offset must be an integer"),
    "offset-near-int64-max": lambda img: (with_table(img, lambda m: m["tensors"][0].update(offset=2**63 - ALIGN)),
                                          f"tensor '{_first(img)}' (offset {2**63 - ALIGN}, "
                                          f"{img.manifest['tensors'][0]['bytes']} bytes) runs past the end of the file"),
    "bytes-negative": lambda img: (with_table(img, lambda m: m["tensors"][0].update(bytes=-4)),
                                   f"tensor '{_first(img)}' has a negative offset or size"),
    "dimension-huge": lambda img: (with_table(img, lambda m: m["tensors"][0].update(shape=[2**41])),
                                   f"tensor '{_first(img)}' has invalid dimension {2**41}"),
    "element-count-overflow": lambda img: (with_table(img, lambda m: m["tensors"][0].update(shape=[2**40] * 3)),
                                           f"tensor '{_first(img)}' has too many elements (shape "
                                           f"{_shape([2**40] * 3)})"),
    "shape-not-array": lambda img: (with_table(img, lambda m: m["tensors"][0].update(shape=7)),
                                    "tensor shape must be an array"),
    "crc-uppercase": lambda img: (with_table(img, lambda m: m["tensors"][0].update(crc32="ABCDEF01")),
                                  f"tensor '{_first(img)}' has an invalid crc32 field"),
    "dtype-unknown": lambda img: (with_table(img, lambda m: m["tensors"][0].update(dtype="i4")),
                                  f"tensor '{_first(img)}' has unknown dtype 'i4'"),
    # --- tensors that disagree with the compiled spec
    "dtype-disagrees-with-spec": _case_dtype_vs_spec,
    "shape-disagrees-with-spec": _case_shape_vs_spec,
    "missing-final-norm": lambda img: (with_table(img, lambda m: m.update(
        tensors=[t for t in m["tensors"] if t["name"] != "final_norm"])), "engine file has no tensor 'final_norm'"),
    # --- manifest sections read after the table
    "eos-out-of-range": lambda img: (with_table(img, lambda m: m["generation"].update(eos_token_ids=[img.vocab])),
                                     f"manifest: generation.eos_token_ids holds {img.vocab}, not a token id of this "
                                     f"model (vocabulary size {img.vocab})"),
    "eos-not-integer": lambda img: (with_table(img, lambda m: m["generation"].update(eos_token_ids=["3"])),
                                    "manifest: generation.eos_token_ids[] must be an integer"),
    "generation-not-object": lambda img: (with_table(img, lambda m: m.update(generation=[3])),
                                          "manifest: field 'generation' must be an object"),
    "tokenizer-garbage": lambda img: (append_tensor(img, TOKENIZER, b"\x00\xffnot json", manifest_extra=
                                                    {"tokenizer": img.manifest.get("tokenizer") or {}}),
                                      "packed tokenizer: tokenizer.json: invalid JSON at byte 0: unexpected character"),
    "tokenizer-without-options": lambda img: (append_tensor(img, TOKENIZER, b"{}", manifest_extra={"tokenizer": None}),
                                              "the packed tokenizer is incomplete (tensor 'tokenizer.json' or manifest "
                                              "'tokenizer')"),
    "tokenizer-bad-options": lambda img: (append_tensor(img, TOKENIZER, b"{}", manifest_extra={"tokenizer": {"bos_token_id": -5}}),
                                          "packed tokenizer: tokenizer options: bos_token_id must be a non-negative "
                                          "integer or null"),
}

# The commands each engine case is run with (all must refuse the file the same way).
ENGINE_COMMANDS = ("info", "verify", "generate")


# ---------------------------------------------------------------------------------------------
# Checkpoint directories


def _st_rewrite(path: Path, mutate: Callable[[dict], None] | None = None, raw_header: bytes | None = None) -> None:
    """Rewrite a safetensors file's header, keeping its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    data = raw[8 + n :]
    if raw_header is None:
        h = json.loads(raw[8 : 8 + n])
        mutate(h)
        raw_header = json.dumps(h).encode()
    path.write_bytes(len(raw_header).to_bytes(8, "little") + raw_header + data)


def _st_file(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


def _st_header(ckpt: Path) -> dict:
    raw = _st_file(ckpt).read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def _st_tensors(ckpt: Path) -> list[tuple[str, dict]]:
    """(name, entry) sorted by data offset."""
    return sorted(((k, v) for k, v in _st_header(ckpt).items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


def _st_data_len(ckpt: Path) -> int:
    raw = _st_file(ckpt).read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def _sc_header_too_large(ckpt):
    p = _st_file(ckpt)
    p.write_bytes((2**40).to_bytes(8, "little") + p.read_bytes()[8:])
    return f"{p}: safetensors header of {2**40} bytes exceeds the {100 * 1024 * 1024}-byte limit"


def _sc_header_past_end(ckpt):
    p = _st_file(ckpt)
    raw = p.read_bytes()
    n = len(raw)  # more than what follows the length field
    p.write_bytes(n.to_bytes(8, "little") + raw[8:])
    return f"{p}: safetensors header claims {n} bytes but the file has {n - 8} after the length"


def _sc_seven_bytes(ckpt):
    p = _st_file(ckpt)
    p.write_bytes(p.read_bytes()[:7])
    return f"{p}: truncated safetensors file (7 bytes, no header)"


def _sc_truncated_data(ckpt):
    p = _st_file(ckpt)
    name, entry = _st_tensors(ckpt)[-1]
    p.write_bytes(p.read_bytes()[:-100])
    return (f"{p}: tensor {name!r} data_offsets {entry['data_offsets']} run past the end of the data "
            f"({_st_data_len(ckpt)} bytes): the file is truncated or corrupt")


def _sc_offsets_out_of_range(ckpt):
    p = _st_file(ckpt)
    name, entry = _st_tensors(ckpt)[0]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    offs = [2**62, 2**62 + size]
    _st_rewrite(p, lambda h: h[name].update(data_offsets=offs))
    return (f"{p}: tensor {name!r} data_offsets {offs} run past the end of the data ({_st_data_len(ckpt)} bytes): "
            "the file is truncated or corrupt")


def _sc_overlap(ckpt):
    p = _st_file(ckpt)
    (a, ea), (b, eb) = _st_tensors(ckpt)[:2]
    size = eb["data_offsets"][1] - eb["data_offsets"][0]
    start = ea["data_offsets"][0] + 4
    _st_rewrite(p, lambda h: h[b].update(data_offsets=[start, start + size]))
    first, second = (a, b) if ea["data_offsets"][0] <= start else (b, a)
    return f"{p}: tensors {first!r} and {second!r} overlap in the data section"


def _sc_dtype(value):
    def case(ckpt):
        p = _st_file(ckpt)
        name, _ = _st_tensors(ckpt)[0]
        _st_rewrite(p, lambda h: h[name].update(dtype=value))
        return f"{p}: tensor {name!r} has unsupported dtype {value!r} (supported: F32, F16, BF16, F64)"
    return case


def _sc_duplicate_key(ckpt):
    p = _st_file(ckpt)
    name, entry = _st_tensors(ckpt)[0]
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    dup = json.dumps({name: entry})[1:-1].encode()
    header_bytes = raw[8 : 8 + n].rstrip()
    _st_rewrite(p, raw_header=header_bytes[:-1] + b", " + dup + b"}")
    return f"{p}: safetensors header is not valid JSON (key {name!r} appears twice)"


def _sc_nested(ckpt):
    p = _st_file(ckpt)
    _st_rewrite(p, raw_header=b'{"x": ' + b"[" * 50000 + b"]" * 50000 + b"}")
    return f"{p}: safetensors header is not valid JSON (nested too deeply)"


def _sc_not_utf8(ckpt):
    p = _st_file(ckpt)
    _st_rewrite(p, raw_header=b'{"\xff": 1}')
    return (f"{p}: safetensors header is not valid JSON ('utf-8' codec can't decode byte 0xff in position 2: "
            "invalid start byte)")


def _sc_negative_dim(ckpt):
    p = _st_file(ckpt)
    name, _ = _st_tensors(ckpt)[0]
    _st_rewrite(p, lambda h: h[name].update(shape=[-1, 4]))
    return f"{p}: tensor {name!r} has an invalid shape [-1, 4]"


def _sc_reversed_offsets(ckpt):
    p = _st_file(ckpt)
    name, entry = _st_tensors(ckpt)[0]
    offs = entry["data_offsets"][::-1]
    if offs[0] == offs[1]:
        offs = [offs[0] + 4, offs[0]]
    _st_rewrite(p, lambda h: h[name].update(data_offsets=offs))
    return f"{p}: tensor {name!r} has invalid data_offsets {offs!r}"


def _cfg(mutate: Callable[[dict], None] | None = None, text: bytes | None = None, message: str = "") -> Callable:
    def case(ckpt: Path) -> str:
        p = ckpt / "config.json"
        if text is not None:
            p.write_bytes(text)
        else:
            cfg = json.loads(p.read_text())
            mutate(cfg)
            p.write_text(json.dumps(cfg))
        return message.format(p=p, vocab=json.loads(p.read_text()).get("vocab_size") if text is None else None)
    return case


def _cfg_is_dir(ckpt: Path) -> str:
    p = ckpt / "config.json"
    p.unlink()
    p.mkdir()
    return f"{p}: cannot read: Is a directory"


def _cfg_bos_out_of_range(ckpt: Path) -> str:
    (ckpt / "generation_config.json").unlink(missing_ok=True)  # its bos_token_id would take precedence
    return _cfg(lambda c: c.update(bos_token_id=10**6),
                message="{p}: field 'bos_token_id' holds 1000000, not a token id in [0, {vocab})")(ckpt)


def _tok_json(mutate: Callable[[dict], None] | None = None, text: bytes | None = None, message: str = "",
              file: str = "tokenizer.json") -> Callable:
    def case(ckpt: Path) -> str:
        p = ckpt / file
        if text is not None:
            p.write_bytes(text)
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            mutate(data)
            p.write_text(json.dumps(data), encoding="utf-8")
        return message.format(p=p, tok=ckpt / "tokenizer.json", cfg=ckpt / "tokenizer_config.json")
    return case


def _jinja_not_utf8(ckpt: Path) -> str:
    p = ckpt / "chat_template.jinja"
    p.write_bytes(b"{{ bos_token }}\xff")
    return f"{p}: not valid UTF-8 (invalid start byte at byte 15)"


def _set_split_pattern(value):
    def mutate(d):
        d["pre_tokenizer"]["pretokenizers"][0]["pattern"] = value
    return mutate


CHECKPOINT_CASES: dict[str, tuple[str, Callable[[Path], str]]] = {
    # --- safetensors
    "st-header-too-large": ("tensors", _sc_header_too_large),
    "st-header-past-end": ("tensors", _sc_header_past_end),
    "st-seven-bytes": ("tensors", _sc_seven_bytes),
    "st-truncated-data": ("tensors", _sc_truncated_data),
    "st-offsets-out-of-range": ("tensors", _sc_offsets_out_of_range),
    "st-overlapping-tensors": ("tensors", _sc_overlap),
    "st-unknown-dtype": ("tensors", _sc_dtype("I8")),
    "st-dtype-not-string": ("tensors", _sc_dtype(["F32"])),
    "st-duplicate-tensor": ("tensors", _sc_duplicate_key),
    "st-header-nested": ("tensors", _sc_nested),
    "st-header-not-utf8": ("tensors", _sc_not_utf8),
    "st-negative-dimension": ("tensors", _sc_negative_dim),
    "st-reversed-offsets": ("tensors", _sc_reversed_offsets),
    # --- config.json
    "config-not-json": ("config", _cfg(text=b'{"model_type": "olmo2",}',
                                       message="{p}: invalid JSON at line 1 column 24: Expecting property name "
                                               "enclosed in double quotes")),
    "config-nested": ("config", _cfg(text=b"[" * 100000, message="{p}: invalid JSON: nested too deeply")),
    "config-not-utf8": ("config", _cfg(text=b'{"model_type": "\xff"}',
                                       message="{p}: not valid UTF-8 (invalid start byte at byte 16)")),
    "config-is-directory": ("config", _cfg_is_dir),
    "config-vocab-huge": ("config", _cfg(lambda c: c.update(vocab_size=10**30),
                                         message=f"{{p}}: field 'vocab_size' = {10**30} is too large (at most {2**24})")),
    "config-hidden-float": ("config", _cfg(lambda c: c.update(hidden_size=256.0),
                                           message="{p}: field 'hidden_size' must be an integer, got 256.0")),
    "config-eps-inf": ("config", _cfg(text=None, mutate=lambda c: c.update(rms_norm_eps=float("inf")),
                                      message="{p}: field 'rms_norm_eps' must be a finite number, got inf")),
    "config-eps-huge-int": ("config", _cfg(lambda c: c.update(rms_norm_eps=10**400),
                                           message=f"{{p}}: field 'rms_norm_eps' must be a finite number, got {10**400}")),
    "config-max-positions-huge": ("config", _cfg(lambda c: c.update(max_position_embeddings=2**31),
                                                 message=f"{{p}}: field 'max_position_embeddings' = {2**31} is too "
                                                         f"large (at most {2**31 - 1})")),
    "config-rope-theta-string": ("config", _cfg(lambda c: (c.update(rope_theta="big"), (c.get("rope_parameters") or {}).pop("rope_theta", None)),
                                                message="{p}: field 'rope_theta' must be a finite number, got 'big'")),
    "config-bos-out-of-range": ("config", _cfg_bos_out_of_range),
    # --- tokenizer.json / tokenizer_config.json / chat_template.jinja
    "tokenizer-not-json": ("tokenizer", _tok_json(text=b"{", message="{p}: not valid UTF-8 JSON: Expecting property "
                                                                     "name enclosed in double quotes: line 1 column 2 "
                                                                     "(char 1)")),
    "tokenizer-nested": ("tokenizer", _tok_json(text=b"[" * 100000, message="{p}: not valid UTF-8 JSON: nested too deeply")),
    "tokenizer-split-pattern-string": ("tokenizer", _tok_json(_set_split_pattern("\\s+"),
                                                              message="{p}: unsupported pre_tokenizer.pretokenizers[0]."
                                                                      "pattern '\\\\s+' (afs supports byte-level BPE "
                                                                      "tokenizers of the OLMo 2 / Llama 3 / GPT-2 kind)")),
    "tokenizer-split-regex-list": ("tokenizer", _tok_json(_set_split_pattern({"Regex": ["a"]}),
                                                          message="{p}: unsupported pre_tokenizer.pretokenizers[0].pattern "
                                                                  "{{'Regex': ['a']}} (afs supports byte-level BPE "
                                                                  "tokenizers of the OLMo 2 / Llama 3 / GPT-2 kind)")),
    "tokenizer-processors-not-list": ("tokenizer", _tok_json(
        lambda d: d.update(post_processor={"type": "Sequence", "processors": 5}),
        message="{p}: post_processor.processors must be a list")),
    "tokenizer-added-token-without-id": ("tokenizer", _tok_json(
        lambda d: d["added_tokens"][0].pop("id"),
        message='{p}: added_tokens[0] must be an object with a string "content" and an integer "id"')),
    "tokenizer-added-token-content-list": ("tokenizer", _tok_json(
        lambda d: d["added_tokens"][1].update(content=["x"]),
        message='{p}: added_tokens[1] must be an object with a string "content" and an integer "id"')),
    "tokenizer-merge-unknown-token": ("tokenizer", _tok_json(
        lambda d: d["model"]["merges"].insert(0, "zzzq qqqz"),
        message="{p}: tokenizer.json: merge 0 ('zzzq', 'qqqz') uses a token missing from the vocab")),
    "tokenizer-vocab-id-huge": ("tokenizer", _tok_json(
        lambda d: d["model"]["vocab"].update({"Ġt": 2**40}),
        message=f"{{p}}: tokenizer.json: model.vocab id {2**40} is out of range")),
    "tokenizer-config-nested": ("tokenizer", _tok_json(text=b"[" * 100000, file="tokenizer_config.json",
                                                       message="{p}: not valid UTF-8 JSON: nested too deeply")),
    "tokenizer-config-class-list": ("tokenizer", _tok_json(lambda c: c.update(tokenizer_class=["x"]),
                                                           file="tokenizer_config.json",
                                                           message="{p}: tokenizer_class must be a string, not ['x']")),
    "tokenizer-config-eos-unknown": ("tokenizer", _tok_json(lambda c: c.update(eos_token="<|nope|>"),
                                                            file="tokenizer_config.json",
                                                            message="{p}: eos_token '<|nope|>' is not a token of "
                                                                    "tokenizer.json")),
    "chat-template-not-utf8": ("tokenizer", _jinja_not_utf8),
}


def write_small_tokenizer(directory: Path, n_merges: int = 48) -> None:
    """tokenizer.json + tokenizer_config.json: the demo tokenizer cut to its 256 byte symbols, its first
    merges and its added tokens (309 ids: small enough for the test shapes' vocabularies)."""
    from afs_build.demo_tokenizer import write_demo_tokenizer

    write_demo_tokenizer(directory)
    path = directory / "tokenizer.json"
    d = json.loads(path.read_text(encoding="utf-8"))
    keep = 256 + n_merges
    d["model"]["merges"] = d["model"]["merges"][:n_merges]
    d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if i < keep}
    new_ids = {}
    for k, a in enumerate(d["added_tokens"]):
        new_ids[str(a["id"])] = str(keep + k)
        a["id"] = keep + k
    path.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {new_ids[k]: v for k, v in cfg.get("added_tokens_decoder", {}).items()}
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def run_stage(stage: str, ckpt: Path) -> None:
    """Runs the builder stage a checkpoint case targets (raises its AfsBuildError)."""
    if stage == "tensors":
        from afs_build.checkpoint import read_checkpoint_tensors

        read_checkpoint_tensors(ckpt)
    elif stage == "config":
        from afs_build.config import load_config

        load_config(ckpt)
    else:
        from afs_build.tokenizer import load_tokenizer

        load_tokenizer(ckpt, None)


# ---------------------------------------------------------------------------------------------
# Writing the corpus out


def write_corpus(engine_dir: Path, checkpoint: Path, out: Path) -> dict:
    """Writes every case under out/ with the expected messages in out/expected.json."""
    img = EngineImage.read(engine_dir / "model.afs")
    expected: dict[str, dict] = {"engine": {}, "checkpoint": {}}
    (out / "engine").mkdir(parents=True, exist_ok=True)
    for name, make in ENGINE_CASES.items():
        data, message = make(img)
        path = out / "engine" / f"{name}.afs"
        path.write_bytes(data)
        expected["engine"][name] = {"file": str(path), "message": f"{path}: {message}"}
    for name, (stage, make) in CHECKPOINT_CASES.items():
        d = out / "checkpoint" / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(checkpoint, d)
        expected["checkpoint"][name] = {"dir": str(d), "stage": stage, "message": make(d)}
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    return expected


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the malformed-input corpus with its expected errors.")
    ap.add_argument("--engine", type=Path, required=True, help="a built engine directory (its model.afs is corrupted)")
    ap.add_argument("--checkpoint", type=Path, required=True,
                    help="a checkpoint directory with model.safetensors, config.json and tokenizer files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    exp = write_corpus(args.engine, args.checkpoint, args.out)
    print(f"wrote {len(exp['engine'])} engine files and {len(exp['checkpoint'])} checkpoints to {args.out}")
