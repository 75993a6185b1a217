"""Where the runtime sources (src/, include/, templates/, CMakeLists.txt) live.

In a source checkout they sit next to afs_build/; an installed wheel carries a copy under
afs_build/_runtime/.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def runtime_root() -> Path:
    for root in (_HERE / "_runtime", _HERE.parent):
        if (root / "CMakeLists.txt").exists() and (root / "templates").is_dir() and (root / "include" / "afs").is_dir():
            return root
    raise FileNotFoundError(
        f"afs runtime sources not found next to {_HERE}; reinstall afs (pip install .) from a complete checkout"
    )


@lru_cache(maxsize=1)
def runtime_hash() -> str:
    """Hash of every runtime source and template: part of the build cache key."""
    root = runtime_root()
    h = hashlib.sha256()
    files = [root / "CMakeLists.txt"]
    for sub in ("src", "include", "templates"):
        files += sorted(p for p in (root / sub).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
