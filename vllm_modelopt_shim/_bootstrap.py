"""Start-up wiring: chain the shadowed sitecustomize, read settings, arm the import hook.

Runs in every Python process with the checkout on PYTHONPATH, most of which never import
vLLM, so it is stdlib-only and imports nothing new (no importlib.util, no typing, no
wrapt): the hook costs one string comparison per import until vLLM's
``qwen3_vl_moe`` module loads, and only then does ``patch`` (and wrapt) come in.
It never raises: problems become one line on stderr.
"""

from __future__ import annotations

import os
import sys

from . import settings as _settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__all__ = ["TARGET", "boot", "install", "installed"]

#: vLLM's module defining Qwen3VLMoeForConditionalGeneration (0.11 through 0.33 at least).
TARGET = "vllm.model_executor.models.qwen3_vl_moe"

_booted = False


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"vllm-modelopt-shim: {message}\n")
    except Exception:  # pragma: no cover - stderr closed
        pass


def boot(sitecustomize_file: str) -> None:
    """Called by the repository's sitecustomize.py; idempotent and exception-free."""
    global _booted
    if _booted:
        return
    _booted = True
    try:
        _chain_shadowed(os.path.dirname(os.path.abspath(sitecustomize_file)))
    except SystemExit:
        raise  # what CPython itself does with a sitecustomize that exits
    except BaseException as exc:  # the shadowed file's own error: report as CPython would
        _say(f"error in the shadowed sitecustomize: {type(exc).__name__}: {exc}")
    try:
        if _settings.load().enabled:
            install()
    except Exception as exc:  # pragma: no cover - defensive: never break start-up
        _say(f"not armed ({type(exc).__name__}: {exc}); vLLM runs stock")


def _chain_shadowed(here: str) -> None:
    """Run the sitecustomize that ours hides on sys.path (Debian/Ubuntu ship one), once."""
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    for finder in sys.meta_path:
        if getattr(finder, "__name__", "") == "PathFinder":
            spec = finder.find_spec("sitecustomize", paths)  # type: ignore[call-arg]
            break
    else:  # pragma: no cover - every CPython has PathFinder
        return
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return
    module = type(sys)("sitecustomize")
    module.__file__ = spec.origin
    module.__spec__ = spec
    module.__loader__ = spec.loader
    spec.loader.exec_module(module)


class _Loader:
    """Wraps the real loader of TARGET: run it, then patch, then step out of the way."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[attr-defined, no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        # leave no trace of ourselves on the module
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader  # type: ignore[assignment]
        _disarm()
        _patch(module)


class _Finder:
    """A meta-path finder that only ever answers for TARGET."""

    vllm_modelopt_shim = True

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
        return spec

    def invalidate_caches(self) -> None:
        pass


def _patch(module: ModuleType) -> None:
    try:
        from . import patch

        patch.apply(module)
    except Exception as exc:  # never break vLLM's import
        _say(f"could not patch {TARGET} ({type(exc).__name__}: {exc}); vLLM runs stock")


def installed() -> bool:
    """Whether the import hook is armed in this process."""
    return any(getattr(f, "vllm_modelopt_shim", False) for f in sys.meta_path)


def _disarm() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "vllm_modelopt_shim", False)]


def install() -> None:
    """Patch now if vLLM's module is loaded, else arm the hook (idempotent; never twice)."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif not installed():
        sys.meta_path.insert(0, _Finder())  # type: ignore[arg-type]
