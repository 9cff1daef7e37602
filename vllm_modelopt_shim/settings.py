"""Environment variables -> one frozen settings object.

Stdlib only and import-free: this module runs in every Python process that has the
checkout on PYTHONPATH, so it must cost microseconds.  Variables carry the ``VLLM_``
prefix because vLLM forwards ``VLLM_*`` to Ray workers.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Settings", "load", "ENABLE", "VERIFY", "HARMONIZE", "REPORT"]

ENABLE = "VLLM_MODELOPT_SHIM"
VERIFY = "VLLM_MODELOPT_SHIM_VERIFY"
HARMONIZE = "VLLM_MODELOPT_SHIM_HARMONIZE"
REPORT = "VLLM_MODELOPT_SHIM_REPORT"

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")
VERIFY_MODES = ("error", "warn", "off")


def _stderr(message: str) -> None:
    sys.stderr.write(f"vllm-modelopt-shim: WARNING {message}\n")


class Settings:
    """What the shim does in this process; immutable once read."""

    __slots__ = ("enabled", "verify", "harmonize", "report_dir", "why")

    enabled: bool
    verify: str
    harmonize: bool
    report_dir: str | None
    why: str

    def __init__(
        self,
        enabled: bool = True,
        verify: str = "error",
        harmonize: bool = True,
        report_dir: str | None = None,
        why: str = "default",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        for key, value in zip(self.__slots__, (enabled, verify, harmonize, report_dir, why)):
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Settings are frozen; set the environment variables instead")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Settings({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def _flag(env: Mapping[str, str], key: str, warn: Callable[[str], None]) -> bool:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return True
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    warn(f"{key}={raw!r} is not one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}; using the default (on)")
    return True


def load(env: Mapping[str, str] | None = None, warn: Callable[[str], None] = _stderr) -> Settings:
    """Read the four variables; a bad value warns once, naming the accepted ones, then defaults."""
    env = os.environ if env is None else env
    enabled = _flag(env, ENABLE, warn)
    raw_verify = env.get(VERIFY, "").strip().lower() or "error"
    if raw_verify not in VERIFY_MODES:
        warn(f"{VERIFY}={env.get(VERIFY)!r} is not one of {', '.join(VERIFY_MODES)}; using the default (error)")
        raw_verify = "error"
    harmonize = _flag(env, HARMONIZE, warn)
    report = env.get(REPORT, "").strip() or None
    why = f"{ENABLE}={env[ENABLE]!r}" if env.get(ENABLE, "").strip() else "default"
    return Settings(enabled, raw_verify, harmonize, report, why)
