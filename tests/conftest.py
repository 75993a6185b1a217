"""Shared fixtures: tiny deterministic OLMo 2 checkpoints, engines built once per session, the gpu marker.

Checkpoints are made with HF transformers' Olmo2ForCausalLM (seeded, torch CPU) and written with
save_pretrained, so the oracle and the builder read the very same files. Engines are built once per
(shape, dtype, variant) per session into a temporary directory; compiles share one build cache
($AFS_CACHE_DIR when set, else a per-session temporary directory, so a run starts cold).

    PYTHONPATH=python:. python -m pytest tests -q              # everything (GPU tests skip without a GPU)
    AFS_CACHE_DIR=~/.cache/afs python -m pytest tests -q       # reuse compiled engines between runs
    tests/run_sanitized.sh                                     # everything under ASan + UBSan

Under tests/run_sanitized.sh (AFS_TEST_SANITIZE=1) every engine is built with AFS_SANITIZE=1, and a
sanitizer report from any process the suite starts fails the test that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import afs_build  # noqa: F401
except ImportError:  # running in-tree without `pip install .`
    _root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(_root / "python"), str(_root)]
    import afs_build  # noqa: F401

import afs  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """A tiny OLMo 2 shape. Intermediate sizes are deliberately not multiples of 64."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int = 2
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 512
    eos_token_id: int = 3
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def gqa(self) -> int:
        return self.heads // self.kv_heads


SHAPES = {
    s.name: s
    for s in (
        # MHA, head_dim 128
        Shape("mha_hd128", hidden=256, heads=2, kv_heads=2, intermediate=200, vocab=384, rope_theta=10000.0),
        # GQA 2, head_dim 64 (the demo's ratio); the default shape for API and CLI checks
        Shape("gqa2_hd64", hidden=256, heads=4, kv_heads=2, intermediate=328, vocab=500),
        # GQA 4, head_dim 64
        Shape("gqa4_hd64", hidden=512, heads=8, kv_heads=2, intermediate=600, vocab=448, rms_norm_eps=1e-5),
        # GQA 5 (OLMo-2-0325-32B's ratio), head_dim 64, k_norm narrower than q_norm by 5x
        Shape("gqa5_hd64", hidden=320, heads=5, kv_heads=1, intermediate=520, vocab=1000),
    )
}
DEFAULT_SHAPE = "gqa2_hd64"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def hf_config_kwargs(shape: Shape) -> dict:
    return dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        bos_token_id=None,
        eos_token_id=shape.eos_token_id,
        pad_token_id=shape.pad_token_id,
        tie_word_embeddings=False,
    )


def to_4x_dialect(config: dict) -> dict:
    """Rewrite a transformers 5.x config.json into the 4.x dialect the hub files use."""
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    params = config.get("rope_parameters") or {}
    out["rope_theta"] = params.get("rope_theta", config.get("rope_theta"))
    if params.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        out["rope_scaling"] = None
    out["torch_dtype"] = config.get("dtype", "float32")
    out["transformers_version"] = "4.48.0"
    return out


def make_checkpoint(
    out: Path,
    shape: Shape,
    *,
    seed: int = 0,
    dialect: str = "5.x",
    max_shard_size: str | None = None,
    init_std: float = 0.05,
) -> Path:
    """Write a deterministic random-weight OLMo 2 checkpoint of `shape` to `out` and return it.

    Matrices are N(0, init_std) (larger than HF's 0.02 so logits are well spread), norm weights
    1 + 0.1 N(0, 1) so every norm matters. dialect "4.x" rewrites config.json the way the hub files
    are written (top-level rope_theta, rope_scaling null, torch_dtype); max_shard_size produces a
    sharded checkpoint with model.safetensors.index.json.
    """
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    assert dialect in ("5.x", "4.x"), dialect
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(Olmo2Config(**hf_config_kwargs(shape)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # every 1-D parameter of OLMo 2 is an RMSNorm weight
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if dialect == "4.x":
        cfg_path = out / "config.json"
        cfg = to_4x_dialect(json.loads(cfg_path.read_text()))
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Engines


@dataclass
class BuiltEngine:
    shape: Shape
    dtype: str
    variant: str
    checkpoint: Path
    dir: Path
    _engine: afs.Engine | None = None

    @property
    def binary(self) -> Path:
        return self.dir / "bin" / "afs-engine"

    @property
    def model_file(self) -> Path:
        return self.dir / "model.afs"

    @property
    def engine(self) -> afs.Engine:
        if self._engine is None:
            self._engine = afs.load(self.dir)
        return self._engine

    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())


VARIANTS = {
    "plain": {},
    "sharded": {"max_shard_size": "400KB"},
    "dialect4": {"dialect": "4.x"},
}


class EngineCache:
    """Checkpoints and engines made on first use and kept for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checkpoints: dict[tuple[str, str], Path] = {}
        self._engines: dict[tuple[str, str, str], BuiltEngine] = {}
        self._hf: dict[tuple[str, str, str], object] = {}

    def checkpoint(self, shape: str, variant: str = "plain") -> Path:
        key = (shape, variant)
        if key not in self._checkpoints:
            path = self.root / "checkpoints" / f"{shape}-{variant}"
            if path.exists():
                shutil.rmtree(path)
            self._checkpoints[key] = make_checkpoint(path, SHAPES[shape], **VARIANTS[variant])
        return self._checkpoints[key]

    def get(self, shape: str, dtype: str = "fp32", variant: str = "plain") -> BuiltEngine:
        from afs_build.cli import build_engine

        key = (shape, dtype, variant)
        if key not in self._engines:
            ckpt = self.checkpoint(shape, variant)
            out = self.root / "engines" / f"{shape}-{dtype}-{variant}"
            build_engine(model=str(ckpt), arch="cpu", dtype=dtype, output=out, quiet=True)
            assert not SANITIZE or asan_instrumented(out / "bin" / "afs-engine"), "AFS_SANITIZE=1 did not take effect"
            self._engines[key] = BuiltEngine(SHAPES[shape], dtype, variant, ckpt, out)
        return self._engines[key]

    def hf_model(self, shape: str, torch_dtype: str = "float32", variant: str = "plain"):
        """The HF oracle loaded from the same checkpoint files the engine was built from."""
        from reference import load_hf_model

        key = (shape, torch_dtype, variant)
        if key not in self._hf:
            self._hf[key] = load_hf_model(self.checkpoint(shape, variant), torch_dtype)
        return self._hf[key]


@pytest.fixture(scope="session", autouse=True)
def afs_cache_dir(tmp_path_factory) -> Path:
    """The compile cache all builds of this session share."""
    if os.environ.get("AFS_CACHE_DIR"):
        return Path(os.environ["AFS_CACHE_DIR"]).expanduser()
    path = tmp_path_factory.mktemp("afs-cache")
    os.environ["AFS_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def engines(tmp_path_factory, afs_cache_dir) -> EngineCache:
    return EngineCache(tmp_path_factory.mktemp("afs-engines"))


@pytest.fixture(scope="session")
def default_engine(engines) -> BuiltEngine:
    """The fp32 engine of the default shape, for API, CLI and file-format checks."""
    return engines.get(DEFAULT_SHAPE, "fp32")


# ---------------------------------------------------------------------------------------------
# Running the tools as a user would


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for afs-build / afs-engine subprocesses: the imported afs packages on PYTHONPATH."""
    env = dict(os.environ)
    roots = [str(Path(afs_build.__file__).resolve().parent.parent), str(Path(afs.__file__).resolve().parent.parent)]
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + ([old] if old else [])))
    if SANITIZE:  # the child loads sanitized modules: libasan first, and no leak check of CPython
        env.update(LD_PRELOAD=_sanitizer["preload"], ASAN_OPTIONS=_sanitizer["python_asan_options"])
    env.update(extra)
    return env


def run_afs_build(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "afs_build.cli", *args],
        capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout,
    )


def run_engine(binary: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The suite under ASan + UBSan (tests/run_sanitized.sh)
#
# The pytest process runs with libasan preloaded and its own sanitizer options (set by the
# script): a report in it aborts the run. The processes it starts end with exit status 86 on a
# report, and ASan writes theirs under a log directory; both are checked after each test. (GCC's
# UBSan, loaded as a plugin of ASan, ignores log_path: its reports go to the child's stderr, so
# the exit status is what catches them.) Engine binaries run with leak checking; Python children
# (through subprocess_env) without, since CPython keeps its allocations at exit. Compilers run
# without libasan preloaded (it slows them down by half).

SANITIZE = os.environ.get("AFS_TEST_SANITIZE") == "1"
SANITIZER_EXIT = 86
# Wall-clock budgets of latency checks are multiplied by this: the sanitized engine runs about 10x
# slower (-O1 and a check on every access; 64 concurrent streaming clients take 28 s against 3 s).
TIME_SCALE = 10 if SANITIZE else 1
_sanitizer: dict = {"exits": []}


def asan_instrumented(path: Path) -> bool:
    return b"__asan_init" in Path(path).read_bytes()


def _start_sanitized_session() -> None:
    import importlib.util

    how = "run the sanitized suite with tests/run_sanitized.sh"
    if "libasan" not in Path("/proc/self/maps").read_text():
        pytest.exit(f"AFS_TEST_SANITIZE=1 needs libasan preloaded into Python: {how}", returncode=2)
    native = importlib.util.find_spec("afs._native")
    if native is None or not asan_instrumented(Path(native.origin)):
        pytest.exit(f"AFS_TEST_SANITIZE=1: afs._native is not an ASan build ({native and native.origin}): {how}",
                    returncode=2)
    reports = Path(tempfile.mkdtemp(prefix="afs-sanitizer-reports-"))
    common = f"halt_on_error=1:exitcode={SANITIZER_EXIT}:log_path={reports}/report"
    _sanitizer.update(reports=reports, preload=os.environ.pop("LD_PRELOAD"),
                      python_asan_options=f"detect_leaks=0:{common}")
    os.environ.update(AFS_SANITIZE="1", ASAN_OPTIONS=f"detect_leaks=1:strict_string_checks=1:{common}",
                      UBSAN_OPTIONS=f"print_stacktrace=1:{common}")
    wait = subprocess.Popen.wait

    def wait_and_note_reports(self, timeout=None):
        rc = wait(self, timeout)
        if rc == SANITIZER_EXIT and self not in _sanitizer["exits"]:
            _sanitizer["exits"].append(self)
        return rc

    subprocess.Popen.wait = wait_and_note_reports  # subprocess.run and communicate() end in wait()


def _take_sanitizer_reports() -> str:
    """The reports since the last call: ASan's log files (then removed) and the children that
    ended with the sanitizers' exit status."""
    texts = [f"--- exit status {SANITIZER_EXIT} (a sanitizer report on its stderr): {p.args}"
             for p in _sanitizer["exits"]]
    _sanitizer["exits"].clear()
    for p in sorted(_sanitizer["reports"].iterdir()):
        texts.append(f"--- {p.name}\n{p.read_text(errors='replace')}")
        p.unlink()
    return "\n".join(texts)


@pytest.fixture(autouse=True)
def no_sanitizer_reports():
    yield
    if SANITIZE and (reports := _take_sanitizer_reports()):
        pytest.fail(f"sanitizer report from a process this test started:\n{reports[-20000:]}", pytrace=False)


def pytest_sessionfinish(session, exitstatus) -> None:
    if SANITIZE and "reports" in _sanitizer and (reports := _take_sanitizer_reports()):
        print(f"\nsanitizer report outside any test:\n{reports}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------------------
# The gpu marker


def _gpu_available() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and nvcc (skipped otherwise)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference` from any test
    if SANITIZE:
        _start_sanitized_session()


def pytest_collection_modifyitems(config, items) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _gpu_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi did not work)")
        for item in gpu_items:
            item.add_marker(skip)


__all__ = [
    "SHAPES", "DEFAULT_SHAPE", "Shape", "BuiltEngine", "EngineCache", "make_checkpoint", "to_4x_dialect",
    "hf_config_kwargs", "subprocess_env", "run_afs_build", "run_engine", "SANITIZE", "TIME_SCALE",
    "asan_instrumented",
]
