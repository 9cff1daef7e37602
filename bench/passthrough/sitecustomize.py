"""Benchmark-only stand-in for the shim (``bench/ladder.py``): the same hook point, no logic.

Wraps ``Qwen3VLMoeForConditionalGeneration.load_weights`` when vLLM imports the module and hands
vLLM its own weights through one pass-through generator: what any shim of this shape costs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

TARGET = "vllm.model_executor.models.qwen3_vl_moe"


def _wrap(module: Any) -> None:
    cls = module.Qwen3VLMoeForConditionalGeneration
    original = cls.load_weights

    def load_weights(self: Any, weights: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, ((name, tensor) for name, tensor in weights), *args, **kwargs)

    load_weights.bench_passthrough = True  # type: ignore[attr-defined]
    cls.load_weights = load_weights


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _wrap(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())
