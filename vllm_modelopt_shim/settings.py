"""Environment variables -> one frozen settings object.

Stdlib only.  Variables carry the VLLM_ prefix because vLLM forwards VLLM_* to Ray workers.
Read when the hook fires and at each load (tests and operators change them between loads); a bad
value warns once per process, on stderr, naming the accepted values.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["AWQ", "ENABLE", "HARMONIZE", "REPORT", "VERIFY", "Settings", "flag", "load"]

ENABLE, VERIFY = "VLLM_MODELOPT_SHIM", "VLLM_MODELOPT_SHIM_VERIFY"
HARMONIZE, REPORT = "VLLM_MODELOPT_SHIM_HARMONIZE", "VLLM_MODELOPT_SHIM_REPORT"
AWQ = "VLLM_MODELOPT_SHIM_AWQ"
VERIFY_MODES = ("error", "warn", "off")
AWQ_MODES = ("fold", "refuse")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


_warned: set[str] = set()


def _stderr(message: str) -> None:
    """Warn on stderr, once per message per process (settings are read at every load)."""
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"vllm-modelopt-shim: WARNING {message}\n")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the shim does in this process; immutable once read (set the environment variables instead)."""

    enabled: bool = True
    verify: str = "error"
    harmonize: bool = True
    report_dir: str | None = None
    awq: str = "fold"  # NVFP4_AWQ checkpoints: fold pre_quant_scale into tensors vLLM uses, or refuse them

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {self.verify!r}")
        if self.awq not in AWQ_MODES:
            raise ValueError(f"awq must be one of {AWQ_MODES}, not {self.awq!r}")


def flag(env: Mapping[str, str], key: str, warn: Callable[[str], None] = _stderr) -> bool:
    """On unless set to 0/false/off/no; any other value warns once, naming the accepted ones."""
    value = env.get(key, "").strip().lower()
    if value in _FALSE:
        return False
    if value and value not in _TRUE:
        warn(f"{key}={env[key]!r} is not one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}; using the default (on)")
    return True


def load(env: Mapping[str, str] | None = None, warn: Callable[[str], None] = _stderr) -> Settings:
    """Read the five variables; a bad value warns once, naming the accepted ones, then defaults."""
    env = os.environ if env is None else env
    verify = env.get(VERIFY, "").strip().lower() or "error"
    if verify not in VERIFY_MODES:
        warn(f"{VERIFY}={env[VERIFY]!r} is not one of {', '.join(VERIFY_MODES)}; using the default (error)")
        verify = "error"
    report = env.get(REPORT, "").strip() or None
    awq = env.get(AWQ, "").strip().lower() or "fold"
    if awq not in AWQ_MODES:
        warn(f"{AWQ}={env[AWQ]!r} is not one of {', '.join(AWQ_MODES)}; using the default (fold)")
        awq = "fold"
    return Settings(flag(env, ENABLE, warn), verify, flag(env, HARMONIZE, warn), report, awq)
