"""Make vLLM's environment-variable check know the shim's own ``VLLM_MODELOPT_SHIM*`` variables.

vLLM checks every ``VLLM_*`` variable against its registry ``vllm.envs.environment_variables``
(``Platform.validate_environ``, from ``EngineArgs.create_engine_config``): an unknown one logs
"Unknown vLLM environment variable detected", and ``--fail-on-environ-validation`` refuses to start.
Our variables carry the VLLM_ prefix on purpose (vLLM forwards VLLM_* to Ray workers), so they are
added to that registry.  Each getter returns None: vLLM hashes every registered variable's value
into its torch.compile cache key (``envs.compile_factors``) and the shim's settings change no graph.
Stdlib only; never raises.
"""

from __future__ import annotations

import sys

from . import settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["MODULE", "NAMES", "register"]

#: vLLM's module holding the registry (0.17.1 through 0.34.0 at least)
MODULE = "vllm.envs"
#: every variable settings.py declares, and the tools' (scripts/venv.py, tests/vllm_runs.py, bench/)
NAMES: tuple[str, ...] = tuple(
    sorted(
        {v for k, v in vars(settings).items() if k.isupper() and isinstance(v, str) and v.startswith(settings.ENABLE)}
        | {f"{settings.ENABLE}_{tail}" for tail in ("VENVS", "RESULTS", "BENCH")}
    )
)


def _unset() -> None:
    """What vLLM reads for our variables: a constant, so its compile-cache key ignores them."""
    return None


def register(envs: ModuleType) -> bool:
    """Add NAMES to ``envs.environment_variables`` (in place: every reference sees them); True if done."""
    try:
        registry = getattr(envs, "environment_variables", None)
        if not isinstance(registry, dict):
            sys.stderr.write(
                f"vllm-modelopt-shim: {MODULE}.environment_variables not found; vLLM may call "
                "VLLM_MODELOPT_SHIM* variables unknown\n"
            )
            return False
        for name in NAMES:
            registry.setdefault(name, _unset)
        return True
    except Exception as exc:  # never break vLLM's import
        sys.stderr.write(f"vllm-modelopt-shim: could not register its variables ({type(exc).__name__}: {exc})\n")
        return False
