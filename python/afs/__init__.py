"""afs: run engines built by afs-build.

    import afs
    engine = afs.load("engines/olmo2-1b-cpu")
    logits = engine.score([100257, 791, 6864])      # numpy float32 (3, vocab)
    tokens = engine.generate([100257, 791, 6864], max_tokens=16)
"""

from .engine import Engine, EngineError, Request, load
from .sampling import SamplingParams, TokenLogprobs, TokenOutput

__version__ = "0.1.0"
__all__ = ["Engine", "EngineError", "Request", "SamplingParams", "TokenLogprobs", "TokenOutput", "load", "__version__"]
