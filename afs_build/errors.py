"""Errors the builder reports to the user: one sentence naming the file, field or tensor at fault."""


class AfsBuildError(Exception):
    """Base class: afs-build prints the message and exits with status 1 (no traceback)."""


class ResolveError(AfsBuildError):
    """The --model argument could not be turned into a local checkpoint directory."""


class ConfigError(AfsBuildError):
    """config.json / generation_config.json is malformed, inconsistent or unsupported."""


class CheckpointError(AfsBuildError):
    """A safetensors file is malformed, or tensors are missing, extra or misshapen."""


class PlanError(AfsBuildError):
    """The requested target, dtype or option cannot be built for this model."""


class CompileError(AfsBuildError):
    """CMake or the compiler failed."""
