"""afs-build: resolve -> config -> plan -> render -> compile -> pack.

    afs-build --model allenai/OLMo-2-1124-7B --arch sm90 --output engines/olmo2-7b
    afs-build --model ./OLMo-2-0425-1B --arch cpu --dtype fp32
    afs-build --model demo            # small random-weight OLMo 2, no network needed

Each stage announces itself with its elapsed time; compile and pack show progress. Rebuilding
with nothing changed is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from . import __version__
from .checkpoint import find_shards, read_checkpoint_tensors
from .compile import build_dirs, run_build
from .config import ModelSpec, load_config
from .engine_format import manifest_bytes
from .errors import AfsBuildError
from .pack import base_manifest, pack_model
from .plan import EngineSpec, describe, make_plan
from .render import render_sources
from .resolve import Resolved, resolve_model
from .weights import check_weight_map, engine_tensors

STAGES = ("resolve", "config", "plan", "render", "compile", "pack")
STAMP = ".afs-build.json"


class Reporter:
    """Stage lines and progress on stderr; quiet=True prints only errors."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._stage_t = self.t0
        self._last_pct = -1

    def stage(self, name: str) -> None:
        self._stage_t = time.monotonic()
        self._last_pct = -1
        self._name = name

    def done(self, detail: str) -> None:
        if self.quiet:
            return
        i = STAGES.index(self._name) + 1
        dt = time.monotonic() - self._stage_t
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"[{i}/{len(STAGES)}] {self._name:<8} {detail} ({dt:.1f} s)\n")
        sys.stderr.flush()

    def progress(self, done: int, total: int, what: str = "") -> None:
        if self.quiet or total <= 0:
            return
        pct = int(100 * done / total)
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            dt = time.monotonic() - self._stage_t
            sys.stderr.write(f"\r\033[K        {self._name:<8} [{bar}] {pct:3d}% {what[:60]} ({dt:.0f} s)")
            sys.stderr.flush()
        elif pct // 10 != self._last_pct // 10 or pct == 100 and self._last_pct != 100:
            sys.stderr.write(f"        {self._name:<8} {pct:3d}% {what[:70]}\n")
            sys.stderr.flush()
        self._last_pct = pct

    def warn(self, msg: str) -> None:
        sys.stderr.write(f"warning: {msg}\n")

    def note(self, msg: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"{msg}\n")


@dataclass
class BuildResult:
    output: Path
    spec: EngineSpec
    up_to_date: bool
    seconds: float


def _fingerprint(checkpoint: Path) -> list:
    files = [p for p in sorted(checkpoint.iterdir()) if p.is_file() and (p.suffix in (".json", ".safetensors", ".jinja"))]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _tokenizer_section(checkpoint: Path, generation: dict | None, no_chat: bool, r: "Reporter"):
    """(blobs, manifest additions) for the tokenizer, when the checkpoint has one."""
    if not (checkpoint / "tokenizer.json").exists():
        r.warn(f"{checkpoint} has no tokenizer.json: the engine will take token ids only")
        return {}, {}
    from .tokenizer import load_tokenizer

    pack = load_tokenizer(checkpoint, generation, chat=not no_chat)
    for note in pack.notes:
        r.note(f"        tokenizer: {note}")
    extra = {"tokenizer": pack.options}
    if pack.chat is not None and not no_chat:
        extra["chat_template"] = pack.chat
    return {"tokenizer.json": pack.tokenizer_json}, extra


def build_engine(
    model: str,
    arch: str = "auto",
    dtype: str = "bf16",
    output: str | Path | None = None,
    jobs: int | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    no_chat: bool = False,
    quiet: bool = False,
) -> BuildResult:
    r = Reporter(quiet)

    r.stage("resolve")
    res: Resolved = resolve_model(model)
    r.done(f"{model} -> {res.path}")

    r.stage("config")
    spec_m: ModelSpec = load_config(res.path)
    gen_path = res.path / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.exists() else None
    # NOTE: the weight map is checked here, from the shard headers alone, so a broken checkpoint fails before compiling.
    tensors = read_checkpoint_tensors(res.path)
    ignored = check_weight_map(spec_m, tensors)
    r.done(
        f"olmo2, {spec_m.num_layers} layers, hidden {spec_m.hidden_size}, heads {spec_m.num_heads}/{spec_m.num_kv_heads}, "
        f"head_dim {spec_m.head_dim}, vocab {spec_m.vocab_size}"
    )

    r.stage("plan")
    spec = make_plan(spec_m, arch, dtype)
    out = Path(output) if output else Path("engines") / spec.name
    dirs = build_dirs(spec)
    r.done(describe(spec))

    stamp_want = {"build_key": dirs.key, "spec_hash": spec.hash, "source": _fingerprint(res.path),
                  "allow_nonfinite": allow_nonfinite, "no_chat": no_chat}
    stamp_path = out / STAMP
    module_ok = any((out / "python").glob(f"{spec.module_name}*")) if (out / "python").is_dir() else False
    if not force and stamp_path.exists() and (out / "model.afs").exists() and (out / "bin" / "afs-engine").exists() and module_ok:
        try:
            if json.loads(stamp_path.read_text()) == stamp_want:
                r.note(f"up to date: {out} (nothing changed; --force rebuilds)")
                return BuildResult(out, spec, True, time.monotonic() - r.t0)
        except json.JSONDecodeError:
            pass

    r.stage("render")
    written = render_sources(spec, dirs.gen)
    r.done(f"{len(written)} generated files, {sum(written.values())} changed, in {dirs.gen}")

    r.stage("compile")
    out.mkdir(parents=True, exist_ok=True)
    if stamp_path.exists():
        stamp_path.unlink()
    run_build(spec, dirs, out.resolve(), jobs or os.cpu_count() or 1, lambda i, n, what: r.progress(i, n, what))
    shutil.copytree(dirs.gen, out / "src", dirs_exist_ok=True)
    r.done(f"bin/afs-engine and python/{spec.module_name} -> {out}")

    r.stage("pack")
    table = engine_tensors(spec_m)
    blobs, extra = _tokenizer_section(res.path, generation, no_chat, r)
    source = {
        "model": res.model_id,
        "revision": res.revision,
        "random_weights": res.random_weights,
        "shards": [p.name for p in find_shards(res.path)],
        "ignored_tensors": ignored,
    }
    gen_defaults = {"eos_token_ids": list(spec_m.eos_token_ids), "bos_token_id": spec_m.bos_token_id,
                    "pad_token_id": spec_m.pad_token_id}
    manifest = base_manifest(spec.to_json(), spec.hash, source, gen_defaults) | extra
    written_manifest = pack_model(
        out / "model.afs", table, tensors, spec.dtype, manifest, blobs=blobs, allow_nonfinite=allow_nonfinite,
        progress=lambda d, t: r.progress(d, t, f"{d / 1e6:.0f} / {t / 1e6:.0f} MB"), warn=r.warn,
    )
    (out / "manifest.json").write_bytes(manifest_bytes(written_manifest))
    size = (out / "model.afs").stat().st_size
    r.done(f"model.afs {size / 1e6:.1f} MB, {len(written_manifest['tensors'])} tensors")

    stamp_path.write_text(json.dumps(stamp_want))
    total = time.monotonic() - r.t0
    r.note(f"done: {out} in {total:.1f} s" + ("  [random weights: output is not meaningful]" if res.random_weights else ""))
    r.note(f"  run it:  {out}/bin/afs-engine generate --token-ids {spec_m.bos_token_id or 0},1,2 --max-tokens 16")
    return BuildResult(out, spec, False, total)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Checkpoint directory, hub id org/name[@revision], or 'demo'.")
@click.option("--arch", default="auto", show_default=True,
              help="auto | cpu | sm80 | sm86 | sm89 | sm90 | sm90a | sm100, or a comma list of sm archs.")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Weight dtype of the engine.")
@click.option("--output", "-o", default=None, help="Engine directory [default: engines/<build name>].")
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1), help="Parallel compile jobs [default: all cores].")
@click.option("--force", is_flag=True, help="Rebuild and repack even if nothing changed.")
@click.option("--allow-nonfinite", is_flag=True, help="Pack weights holding NaN/Inf (with a warning) instead of failing.")
@click.option("--no-chat", is_flag=True, help="Build without the chat template.")
@click.option("--quiet", "-q", is_flag=True, help="Print only warnings and errors.")
@click.version_option(__version__, prog_name="afs-build")
def main(model, arch, dtype, output, jobs, force, allow_nonfinite, no_chat, quiet) -> None:
    """Build an ahead-of-time compiled OLMo 2 inference engine."""
    try:
        build_engine(model, arch, dtype, output, jobs, force, allow_nonfinite, no_chat, quiet)
    except AfsBuildError as e:
        click.echo(f"afs-build: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # e.g. an output directory that cannot be written: the message names the path
        click.echo(f"afs-build: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("afs-build: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
