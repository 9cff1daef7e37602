"""vllm-modelopt-shim's doorbell (PYTHONPATH=<checkout>): arms the shim in every Python process.

Every interpreter runs this file, most never import vLLM: so it holds only what all must run.  It
chains the sitecustomize it shadows (Debian/Ubuntu ship one) and puts a stdlib-only finder on
sys.meta_path that answers for four vLLM modules alone: vllm.envs (the shim's variables join vLLM's
registry, so its environment check knows them, even with the shim off) and, unless
VLLM_MODELOPT_SHIM is off, qwen3_vl_moe (the patch), quantization.modelopt and
model_arch_config_convertor (where vLLM refuses NVFP4_AWQ's config).
The package (settings, warnings, wrapt, the patch) loads only then.  It never raises.
__pycache__/sitecustomize.cpython-311.pyc is committed (checked-hash: used only while it matches
this source) because compiling even an empty file costs ~1.5 ms under PYTHONDONTWRITEBYTECODE.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    finder = next(f for f in sys.meta_path if getattr(f, "__name__", "") == "PathFinder")
    spec = finder.find_spec("sitecustomize", paths)
    if spec is not None and spec.loader is not None:
        module = type(sys)("sitecustomize")
        module.__file__, module.__spec__, module.__loader__ = spec.origin, spec, spec.loader
        spec.loader.exec_module(module)


class _Doorbell:
    """Rings when vLLM imports vllm.envs or (``patch``) its Qwen3-VL-MoE or ModelOpt module: hands over."""

    def __init__(self, patch: bool) -> None:
        self.vllm_modelopt_shim = patch  # the mark of the patching hook (the plugin's install looks for it)
        self.names = (
            (
                "vllm.envs",
                "vllm.model_executor.models.qwen3_vl_moe",
                "vllm.model_executor.layers.quantization.modelopt",
                "vllm.transformers_utils.model_arch_config_convertor",
            )
            if patch
            else ("vllm.envs",)
        )

    vllm_modelopt_shim_doorbell = True

    def find_spec(
        self, name: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if name not in self.names:  # string compares only: most processes never import vLLM
            return None
        try:
            from vllm_modelopt_shim._bootstrap import find_spec

            return find_spec(self, name, path, target)
        except Exception as exc:  # never break vLLM's import
            sys.stderr.write(f"vllm-modelopt-shim: not armed ({type(exc).__name__}: {exc}); vLLM runs stock\n")
            return None


# once per interpreter, even if this file is reloaded or run again (the first module keeps the flag)
if not getattr(sys.modules.get("sitecustomize"), "vllm_modelopt_shim_rang", False):
    try:
        _chain()
    except Exception as exc:  # what CPython does with a failing sitecustomize: report, go on
        sys.stderr.write(f"vllm-modelopt-shim: error in the shadowed sitecustomize: {type(exc).__name__}: {exc}\n")
    # the "off" spellings of settings.flag(); tests/process keeps the two in step
    off = os.environ.get("VLLM_MODELOPT_SHIM", "").strip().lower() in ("0", "false", "off", "no")
    if not any(getattr(f, "vllm_modelopt_shim_doorbell", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Doorbell(patch=not off))
vllm_modelopt_shim_rang = True
