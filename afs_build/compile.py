"""compile stage: CMake + Ninja over the runtime sources and the rendered sources.

The build tree lives in a cache keyed by afs version, arch list, compiler and runtime-source hash,
one directory per engine spec, so rebuilding an engine (or building it into a second output
directory) recompiles only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import CompileError
from .plan import EngineSpec
from .runtime_tree import runtime_hash, runtime_root

MIN_CMAKE = (3, 26)
_NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")


def cache_root() -> Path:
    env = os.environ.get("AFS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "afs"


def _tool(name: str) -> str | None:
    """A build tool from its PyPI package (pip dependency) or from PATH."""
    try:
        if name == "cmake":
            import cmake  # type: ignore

            cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        else:
            import ninja  # type: ignore

            cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.exists():
            return str(cand)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


def _version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def find_cmake() -> str:
    exe = _tool("cmake")
    if not exe:
        raise CompileError("cmake not found: install it (pip install cmake) or put it on PATH")
    if _version(exe) < MIN_CMAKE:
        raise CompileError(f"{exe} is version {'.'.join(map(str, _version(exe)))}; afs needs CMake >= 3.26 (pip install -U cmake)")
    return exe


def find_ninja() -> str:
    exe = _tool("ninja")
    if not exe:
        raise CompileError("ninja not found: install it (pip install ninja) or put it on PATH")
    return exe


def compiler_id(backend: str) -> str:
    """A short identity of the compilers: part of the build cache key."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise CompileError("no C++ compiler found (install g++ or clang++, or set CXX)")
    parts = [subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0:1]]
    if backend == "cuda":
        nvcc = find_nvcc()
        parts.append(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()[-1:])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


def find_nvcc() -> str:
    cand = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cand:
        if c and Path(c).exists():
            return c
    raise CompileError("--arch sm*: nvcc (the CUDA toolkit) was not found; install it or set CUDACXX, or build with --arch cpu")


@dataclass(frozen=True)
class BuildDirs:
    root: Path  # the cmake build tree
    gen: Path  # rendered sources
    key: str


def sanitize_enabled() -> bool:
    """AFS_SANITIZE=1 builds the engine with AddressSanitizer + UBSan (tests/run_sanitized.sh).
    The binary runs as is; a Python process loading the module needs libasan preloaded."""
    value = os.environ.get("AFS_SANITIZE", "")
    if value not in ("", "0", "1"):
        raise CompileError(f"AFS_SANITIZE={value!r}: expected 1 (ASan + UBSan build) or 0")
    return value == "1"


def build_dirs(spec: EngineSpec) -> BuildDirs:
    target = "cpu" if spec.backend == "cpu" else "-".join(spec.archs)
    key = f"afs{__version__}-{target}-{compiler_id(spec.backend)}-{runtime_hash()}"
    if sanitize_enabled():
        key += "-asan"
    root = cache_root() / "build" / key / f"{spec.name}-{spec.hash}"
    return BuildDirs(root=root, gen=root / "gen", key=key)


def cmake_args(spec: EngineSpec, dirs: BuildDirs) -> list[str]:
    args = [
        "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={find_ninja()}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DAFS_GEN_DIR={dirs.gen}",
        f"-DAFS_MODULE_NAME={spec.module_name}",
        f"-DAFS_BACKEND={spec.backend}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    if sanitize_enabled():
        args.append("-DAFS_SANITIZE=ON")
    try:
        import nanobind  # type: ignore

        args.append(f"-Dnanobind_DIR={nanobind.cmake_dir()}")
    except ImportError:
        raise CompileError("nanobind is not installed (pip install nanobind)") from None
    if spec.backend == "cuda":
        gencode = ";".join(f"arch=compute_{a[2:]},code=sm_{a[2:]}" for a in spec.archs)  # sm90a -> compute_90a
        args += ["-DCMAKE_CUDA_ARCHITECTURES=OFF", f"-DAFS_CUDA_GENCODE={gencode}", f"-DCMAKE_CUDA_COMPILER={find_nvcc()}"]
    return args


def run_build(
    spec: EngineSpec,
    dirs: BuildDirs,
    output: Path,
    jobs: int,
    progress: Callable[[int, int, str], None],
) -> None:
    cmake = find_cmake()
    dirs.root.mkdir(parents=True, exist_ok=True)
    log_path = dirs.root / "build.log"
    args = cmake_args(spec, dirs)
    stamp = dirs.root / "configure.json"
    want = json.dumps({"args": args, "src": str(runtime_root())})
    with open(log_path, "w") as log:
        configured = (dirs.root / "cmake" / "CMakeCache.txt").exists() and stamp.exists() and stamp.read_text() == want
        if not configured:
            _run([cmake, "-S", str(runtime_root()), "-B", str(dirs.root / "cmake"), *args], log, log_path, "configure")
            stamp.write_text(want)
        build_cmd = [cmake, "--build", str(dirs.root / "cmake"), "--parallel", str(jobs)]
        _run(build_cmd, log, log_path, "build", progress)
        _run([cmake, "--install", str(dirs.root / "cmake"), "--prefix", str(output)], log, log_path, "install")


def _run(cmd: list[str], log, log_path: Path, what: str, progress: Callable[[int, int, str], None] | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        tail.append(line.rstrip())
        del tail[:-40]
        m = _NINJA_PROGRESS.match(line.strip())
        if m and progress:
            progress(int(m.group(1)), int(m.group(2)), m.group(3))
    rc = proc.wait()
    log.flush()
    if rc != 0:
        raise CompileError(
            f"{what} failed (exit {rc}); last lines:\n" + "\n".join(tail[-25:]) + f"\nfull log: {log_path}"
        )
