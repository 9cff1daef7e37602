"""The ``vllm.general_plugins`` entry point of a pip install: arms the same hook in every vLLM process.

vLLM calls plugins in the API server, the engine core, each worker (Ray workers too, which get
VLLM_* variables but not PYTHONPATH) and the model-inspection subprocess, without a guard: so this
never raises.  With the checkout also on PYTHONPATH the two share one hook and never patch twice.
vLLM loads plugins in ``EngineArgs.__post_init__``, before ``create_engine_config`` checks VLLM_*
variables: so the shim's variables are registered here too, even with the shim off.
"""

from __future__ import annotations

import os
import sys

__all__ = ["register"]


def register() -> None:
    try:
        from . import _bootstrap, settings

        _bootstrap.register_names()
        if settings.flag(os.environ, settings.ENABLE, warn=lambda _m: None):
            _bootstrap.install()
    except Exception as exc:  # pragma: no cover - a plugin that raises breaks vLLM's start-up
        sys.stderr.write(f"vllm-modelopt-shim: plugin not armed ({type(exc).__name__}: {exc}); vLLM runs stock\n")
