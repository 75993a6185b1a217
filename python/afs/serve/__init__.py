"""afs.serve: the OpenAI-compatible HTTP server (afs-serve). Needs the serve extra:
pip install 'afs[serve]' (FastAPI and uvicorn); `import afs` never needs it.

    from afs.serve import create_app, ServerConfig
    app = create_app(afs.load("engines/olmo2-1b-cpu"), ServerConfig(model_name="olmo2-1b"))
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("create_app", "ServerConfig"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["create_app", "ServerConfig"]
