"""resolve stage: --model -> a local checkpoint directory.

Accepts a local directory, the built-in demo ("demo"), or a hub id `org/name[@revision]` fetched
with huggingface_hub (honours HF_HUB_OFFLINE and HF_HOME). Offline or unreachable hubs give one
clear error telling the user to pass a local directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ResolveError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


@dataclass(frozen=True)
class Resolved:
    path: Path
    model_id: str  # what the user passed, for the manifest and rebuild hints
    revision: str | None = None
    random_weights: bool = False


def resolve_model(model: str) -> Resolved:
    if model == "demo":
        from .demo import demo_checkpoint

        return Resolved(demo_checkpoint(), "demo", random_weights=True)
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ResolveError(f"--model {model}: not a directory (pass a checkpoint directory holding config.json)")
        if not (p / "config.json").exists():
            raise ResolveError(f"--model {model}: no config.json in this directory; is it a Hugging Face checkpoint?")
        return Resolved(p.resolve(), model)
    if not _HUB_ID.match(model):
        raise ResolveError(f"--model {model}: no such directory, and not a hub id of the form org/name[@revision]")
    repo, _, revision = model.partition("@")
    return _download(model, repo, revision or None)


def _download(model: str, repo: str, revision: str | None) -> Resolved:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ResolveError(
            f"--model {model}: huggingface_hub is not installed; pass a local checkpoint directory instead"
        ) from None
    try:
        path = snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same advice
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResolveError(
            f"--model {model}: could not fetch it from the Hugging Face Hub ({type(e).__name__}: {reason}). "
            "If you are offline or the hub is unreachable, download the checkpoint elsewhere and pass its local "
            "directory: afs-build --model /path/to/checkpoint"
        ) from None
    return Resolved(Path(path), model, revision)
