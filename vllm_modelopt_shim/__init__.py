"""vllm-modelopt-shim: stock vLLM loads ModelOpt / llm-compressor NVFP4 Qwen3-VL-MoE checkpoints correctly.

Armed by the repository's sitecustomize.py (PYTHONPATH=<checkout>) or by the vllm.general_plugins
entry point of a pip install; see README.md.
"""

from __future__ import annotations

from ._bootstrap import install, installed
from .errors import (
    CheckpointError,
    ConfigConflictError,
    DamagedShardError,
    DuplicateTensorError,
    ExpertIndexError,
    MissingTensorError,
    MixedLayoutError,
    UnsupportedTensorError,
    UnusableScaleError,
)
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigConflictError",
    "DamagedShardError",
    "DuplicateTensorError",
    "ExpertIndexError",
    "MissingTensorError",
    "MixedLayoutError",
    "Settings",
    "UnsupportedTensorError",
    "UnusableScaleError",
    "__version__",
    "install",
    "installed",
]
