"""The exception family: every refusal names the checkpoint tensor and says what to do.

All are ``ValueError`` (the checkpoint, not the code, is wrong); each carries the
offending tensor name as ``.name`` so callers and tests never parse messages.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DuplicateTensorError",
    "ExpertIndexError",
    "MissingTensorError",
    "MixedLayoutError",
    "UnsupportedTensorError",
    "UnusableScaleError",
    "ConfigConflictError",
    "DamagedShardError",
]


class CheckpointError(ValueError):
    """Base class: the checkpoint cannot be loaded correctly by vLLM, even with the shim."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class ExpertIndexError(CheckpointError, IndexError):
    """An expert index is not below the model's number of experts."""


class DuplicateTensorError(CheckpointError):
    """The same expert tensor arrives twice (e.g. both layouts in one checkpoint)."""


class MissingTensorError(CheckpointError):
    """An expert, projection or suffix that the rest of the layer has is absent."""


class MixedLayoutError(CheckpointError):
    """Fused 3-D experts and per-expert tensors, or two suffix families, in one model."""


class UnsupportedTensorError(CheckpointError):
    """A tensor no vLLM release can apply (``pre_quant_scale``) or whose suffix no family knows."""


class UnusableScaleError(CheckpointError):
    """A global or input scale that is zero, negative or not finite."""


class ConfigConflictError(CheckpointError):
    """config.json spells one setting both ways (transformers 4 and 5) with different values."""


class DamagedShardError(CheckpointError):
    """A safetensors file that safetensors itself would refuse (``name`` is the file)."""
