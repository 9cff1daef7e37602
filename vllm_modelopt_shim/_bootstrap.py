"""The import hook: when vLLM imports its qwen3_vl_moe module, patch it right after it executes.

Also, when vLLM imports ``vllm.envs``, add the shim's variables to vLLM's registry (envnames.py),
so that vLLM's environment check knows them: even with the shim off (VLLM_MODELOPT_SHIM=0 must not
make ``--fail-on-environ-validation`` refuse to start).
Reached from the repository's sitecustomize.py (whose finder delegates here) or from the
vllm.general_plugins entry point (``install``).  Stdlib only; the hook never raises into vLLM.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__all__ = ["CONVERTOR", "ENVS", "MARK", "QUANT", "TARGET", "find_spec", "install", "installed", "register_names"]

#: vLLM's module defining Qwen3VLMoeForConditionalGeneration (0.11 through 0.33 at least)
TARGET = "vllm.model_executor.models.qwen3_vl_moe"
#: vLLM's registry of environment variables (envnames.py)
ENVS = "vllm.envs"
#: where vLLM's config validation refuses quant_algo NVFP4_AWQ (patch.apply_config): the ModelOpt
#: quantization configs, and the hf_config convertor (checkpoints with hf_quant_config.json only)
QUANT = "vllm.model_executor.layers.quantization.modelopt"
CONVERTOR = "vllm.transformers_utils.model_arch_config_convertor"
#: every module the patching hook watches; its finders leave sys.meta_path once all are imported
WATCHED = (ENVS, TARGET, QUANT, CONVERTOR)
#: attribute that marks our finders on sys.meta_path (the doorbell's and ours): never two
MARK = "vllm_modelopt_shim"


class _Loader:
    """Stands in for TARGET's (or ENVS's) real loader: runs it, steps aside, then patches (registers)."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[attr-defined, no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        module.__loader__ = self._loader  # type: ignore[assignment]  # leave no trace on the module
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader  # type: ignore[assignment]
        if all(name in sys.modules for name in WATCHED):  # all done: our finders leave sys.meta_path
            sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, MARK, False)]
        if module.__name__ == ENVS:
            register_names(module)
        elif module.__name__ in (QUANT, CONVERTOR):
            _patch_config(module)
        else:
            _patch(module)


def find_spec(
    finder: object, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
) -> ModuleSpec | None:
    """TARGET's spec from the other finders, its loader wrapped so the patch follows execution."""
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec: ModuleSpec | None = other.find_spec(name, path, target)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
            return spec
    return None


class _Finder:
    """The plugin's finder (the doorbell in sitecustomize.py is the PYTHONPATH one)."""

    vllm_modelopt_shim = True

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        return find_spec(self, name, path, target) if name in WATCHED else None


def _patch(module: ModuleType) -> None:
    try:
        from . import patch

        patch.apply(module)
    except Exception as exc:  # never break vLLM's import
        sys.stderr.write(
            f"vllm-modelopt-shim: could not patch {TARGET} ({type(exc).__name__}: {exc}); vLLM runs stock\n"
        )


def _patch_config(module: ModuleType) -> None:
    try:
        from . import patch

        patch.apply_config(module)
    except Exception as exc:  # never break vLLM's import
        sys.stderr.write(f"vllm-modelopt-shim: could not patch {module.__name__} ({type(exc).__name__}: {exc})\n")


def register_names(envs: ModuleType | None = None) -> None:
    """The shim's variables into vLLM's registry (``envs``, or ENVS if already imported); never raises."""
    try:
        envs = envs if envs is not None else sys.modules.get(ENVS)
        if envs is not None:
            from . import envnames

            envnames.register(envs)
    except Exception as exc:  # never break vLLM's import
        sys.stderr.write(f"vllm-modelopt-shim: variables not registered ({type(exc).__name__}: {exc})\n")


def installed() -> bool:
    """Whether an import hook (the doorbell's or the plugin's) is armed in this process."""
    return any(getattr(f, MARK, False) for f in sys.meta_path)


def install() -> None:
    """Patch now if vLLM's module is loaded, else arm the hook; idempotent (never twice)."""
    register_names()
    for name in (QUANT, CONVERTOR):
        if name in sys.modules:
            _patch_config(sys.modules[name])
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    if not all(name in sys.modules for name in WATCHED) and not installed():
        sys.meta_path.insert(0, _Finder())
