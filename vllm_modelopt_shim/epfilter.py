"""Teach vLLM's expert-parallel weight filter the legacy spelling ``experts.<proj>.<N>.*``.

With ``enable_ep_weight_filter`` (vLLM 0.24+) each EP rank skips the weight tensors of experts it does
not hold *before* reading them: ``model_loader/ep_weight_filter.should_skip_weight`` asks
``parse_expert_id`` for the expert id, which matches only ``.experts.<N>.``.  Legacy names never
match, so every rank would read every expert's bytes.  ``parse_expert_id`` is wrapped (in its module:
``should_skip_weight`` looks it up there at each call, wherever that was imported) to answer legacy
names with the id names.py reads; everything else, including which tensors may be skipped (weights,
never scales) and which experts are local, stays vLLM's.  The shim's coverage check already judges a
rank on the loader's ``local_expert_ids`` (patch.full_load).  Never raises: vLLM stays stock if its
filter does not look as expected.
"""

from __future__ import annotations

import sys

from . import names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MODULE", "apply", "expert_id", "remove"]

MODULE = "vllm.model_executor.model_loader.ep_weight_filter"
_MARK = "_self_vllm_modelopt_shim"


def expert_id(name: str) -> int | None:
    """The expert id of a legacy per-expert tensor name, else None (canonical ids are vLLM's own)."""
    parsed = names.parse(name)
    return parsed.expert if parsed is not None and parsed.layout == names.LEGACY else None


def _parse_expert_id(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    found = wrapped(*args, **kwargs)
    if found is not None:
        return found
    name = args[0] if args else kwargs.get("weight_name")
    try:
        return expert_id(name) if isinstance(name, str) else None
    except Exception:  # a name we cannot read is one vLLM keeps
        return None


def apply() -> bool:
    """Wrap ``parse_expert_id`` once; False (vLLM untouched) where the filter is absent or unexpected."""
    try:
        import importlib

        try:
            module = importlib.import_module(MODULE)
        except ImportError:
            return False  # before vLLM 0.24: no filter, every rank reads everything anyway
        current = getattr(module, "parse_expert_id", None)
        if getattr(current, _MARK, False):
            return True
        if not callable(current) or not callable(getattr(module, "should_skip_weight", None)):
            sys.stderr.write(
                f"vllm-modelopt-shim: {MODULE}.parse_expert_id not found; with enable_ep_weight_filter "
                "each rank reads every legacy-named expert\n"
            )
            return False
        import wrapt

        wrapt.wrap_function_wrapper(module, "parse_expert_id", _parse_expert_id)
        setattr(module.parse_expert_id, _MARK, True)
        return True
    except Exception as exc:  # never break vLLM
        sys.stderr.write(f"vllm-modelopt-shim: EP weight filter left stock ({type(exc).__name__}: {exc})\n")
        return False


def remove() -> None:
    """Undo ``apply`` (tests)."""
    module = sys.modules.get(MODULE)
    current = getattr(module, "parse_expert_id", None)
    if module is not None and getattr(current, _MARK, False):
        module.parse_expert_id = current.__wrapped__  # type: ignore[attr-defined, union-attr]
