"""Peak memory of the pack stage on a 7B-shaped checkpoint (OLMo-2-1124-7B dimensions, random weights).

    PYTHONPATH=python:. python benchmarks/pack_rss.py                   # ~14.6 GB in, ~14.6 GB out
    PYTHONPATH=python:. python benchmarks/pack_rss.py --dir /big/disk   # where the files go
    PYTHONPATH=python:. python benchmarks/pack_rss.py --keep            # keep the files afterwards
    PYTHONPATH=python:. python benchmarks/pack_rss.py --layers 2        # quick: 7B width, 2 layers

Needs about 30 GB of free disk. Steps:
  1. writes config.json with the real 7B dimensions (hidden 4096, 32 layers, 32 heads / 32 kv heads,
     intermediate 11008, vocab 100352, rope_theta 500000, eps 1e-6) and bf16 safetensors shards
     with model.safetensors.index.json. The values are finite pseudo-random bf16 numbers: one 64 MB
     random block, written at varying offsets, so the writer itself stays at ~100 MB;
  2. runs only the pack stage (read_checkpoint_tensors -> check_weight_map -> engine_tensors ->
     pack_model, wired as afs_build.cli.build_engine wires them) in a child process, polling its
     VmHWM in /proc and reading RUSAGE_CHILDREN.ru_maxrss when it exits;
  3. prints "pack 7B-shaped: X.XX GB peak RSS, Y s, Z GB written" and fails when the peak is
     over --limit-gb (2 GB);
  4. deletes the checkpoint and model.afs unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

CONFIG_7B = {
    "architectures": ["Olmo2ForCausalLM"],
    "model_type": "olmo2",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 100352,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 100257,
    "pad_token_id": 100277,
    "torch_dtype": "bfloat16",
    "afs_note": "synthetic 7B-shaped checkpoint with pseudo-random weights (benchmarks/pack_rss.py)",
}

BLOCK_BYTES = 64 << 20
SHARD_BYTES = 4 << 30  # about 4 GB per shard, as HF sharding does for the 7B


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor names and shapes in HF order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_norm.weight", (h,)),
            (p + "self_attn.k_norm.weight", (kv,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "post_feedforward_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def random_block(seed: int = 0) -> memoryview:
    """BLOCK_BYTES of finite bf16 values (~N(0, 0.02)), as raw little-endian bytes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(BLOCK_BYTES // 2, dtype=np.float32) * np.float32(0.02)
    bits = (x.view(np.uint32) >> np.uint32(16)).astype("<u2")  # truncation keeps every value finite
    return memoryview(bits.tobytes())


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], block: memoryview, salt: int) -> int:
    """One safetensors file, streamed from the random block. Returns bytes written."""
    header, off = {}, 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t, (name, shape) in enumerate(tensors):
            left = 2 * int(np.prod(shape))
            # A different even start per tensor, so no two tensors are byte-identical.
            pos = (2 * (salt * 7919 + t * 104729)) % BLOCK_BYTES
            while left:
                n = min(left, BLOCK_BYTES - pos)
                f.write(block[pos:pos + n])
                left -= n
                pos = 0
    return 8 + len(raw) + off


def write_checkpoint(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG_7B, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 100257, "pad_token_id": 100277}) + "\n")
    shapes = tensor_shapes(CONFIG_7B)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * int(np.prod(shape))
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    block = random_block()
    weight_map, total = {}, 0
    for s, tensors in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / fname, tensors, block, s)
        weight_map.update({name: fname for name, _ in tensors})
        print(f"  wrote {fname} ({len(tensors)} tensors)", flush=True)
    index = {"metadata": {"total_size": sum(2 * int(np.prod(s)) for _, s in shapes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# The child: the pack stage alone, as build_engine runs it.
PACK_CHILD = r"""
import sys, time
from pathlib import Path
from afs_build.checkpoint import find_shards, read_checkpoint_tensors
from afs_build.config import load_config
from afs_build.pack import base_manifest, pack_model
from afs_build.plan import make_plan
from afs_build.weights import check_weight_map, engine_tensors

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
spec_m = load_config(ckpt)
spec = make_plan(spec_m, "cpu", "bf16")
tensors = read_checkpoint_tensors(ckpt)
ignored = check_weight_map(spec_m, tensors)
table = engine_tensors(spec_m)
source = {"model": str(ckpt), "revision": None, "random_weights": True,
          "shards": [p.name for p in find_shards(ckpt)], "ignored_tensors": ignored}
gen = {"eos_token_ids": list(spec_m.eos_token_ids), "bos_token_id": spec_m.bos_token_id,
       "pad_token_id": spec_m.pad_token_id}
manifest = base_manifest(spec.to_json(), spec.hash, source, gen)
pack_model(out, table, tensors, spec.dtype, manifest)
"""


def vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_pack(ckpt: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of the pack stage in a child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", PACK_CHILD, str(ckpt), str(out)], env=env)
    hwm = 0
    while child.poll() is None:
        hwm = max(hwm, vm_hwm_kb(child.pid))
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    if child.returncode != 0:
        sys.exit(f"pack failed with exit status {child.returncode}")
    # ru_maxrss of waited-for children, in KiB on Linux: the exact peak, even between two polls.
    peak_kb = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak_kb * 1024.0, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to put the checkpoint and model.afs [default: a temp dir]")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and model.afs")
    ap.add_argument("--limit-gb", type=float, default=2.0, help="fail when the peak RSS is above this")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick run (7B width, less disk)")
    a = ap.parse_args()
    CONFIG_7B["num_hidden_layers"] = a.layers

    work = Path(tempfile.mkdtemp(prefix="afs-pack-rss-", dir=a.dir))
    ckpt, out = work / "olmo2-7b-shaped", work / "model.afs"
    try:
        need = 2 * 2 * sum(int(np.prod(s)) for _, s in tensor_shapes(CONFIG_7B)) * 1.01  # bf16, in + out
        free = shutil.disk_usage(work).free
        if free < need:
            sys.exit(f"{work}: {free / 1e9:.1f} GB free, need about {need / 1e9:.0f} GB (use --dir)")
        t0 = time.monotonic()
        size = write_checkpoint(ckpt)
        print(f"checkpoint: {size / 1e9:.2f} GB in {time.monotonic() - t0:.0f} s -> {ckpt}", flush=True)
        peak, seconds = run_pack(ckpt, out)
        written = out.stat().st_size
        shape = "7B-shaped" if a.layers == 32 else f"7B-shaped ({a.layers} of 32 layers)"
        print(f"pack {shape}: {peak / 1e9:.2f} GB peak RSS, {seconds:.0f} s, {written / 1e9:.2f} GB written")
        if peak > a.limit_gb * 1e9:
            sys.exit(f"FAIL: peak RSS {peak / 1e9:.2f} GB is over the {a.limit_gb} GB limit")
    finally:
        if a.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
