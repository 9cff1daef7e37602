"""Ledger -> problems.  The only place that decides what is an error.

Two moments: ``check_tensor`` before a tensor is forwarded to vLLM (so our message comes
before vLLM's own crash), and ``check_complete`` after vLLM's loader has returned.  Coverage
(every expert x projection x suffix, a router's experts) is judged only where a whole checkpoint
was read; a weight update is judged tensor by tensor (its scale values included).
The runtime and the ``doctor`` command both call these: one truth, two doors.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from .errors import (
    CheckpointError,
    DuplicateTensorError,
    ExpertIndexError,
    MissingTensorError,
    MixedLayoutError,
    UnsupportedTensorError,
    UnusableScaleError,
)
from .ledger import STRIDE, Ledger
from .names import AWQ_SUFFIX, FAMILIES, FUSED, MODELOPT, PROJECTIONS, ExpertName

__all__ = ["check_tensor", "check_complete", "summarize", "usable_scale"]

_AWQ_FULL = (
    "it is an NVFP4_AWQ smoothing factor that no vLLM release applies, so outputs would be wrong: load the "
    "NVFP4_AWQ checkpoint with VLLM_MODELOPT_SHIM_AWQ=fold (the default), which folds it into tensors vLLM "
    "uses, or serve a plain NVFP4 copy made by `vllm-modelopt-shim convert SRC DST`"
)
_AWQ_UPDATE = (
    "it is an NVFP4_AWQ smoothing factor, and a weight update cannot carry one: the shim folds "
    "pre_quant_scale only while loading a whole checkpoint; serve a plain NVFP4 copy made by "
    "`vllm-modelopt-shim convert SRC DST` and send its tensors"
)
#: the one non-expert pre_quant_scale the AWQ folds take (awqfold): o_proj's, into v_proj's rows
_AWQ_ATTENTION = ".self_attn.o_proj." + AWQ_SUFFIX


def _awq(ledger: Ledger, name: str) -> UnsupportedTensorError:
    return UnsupportedTensorError(name, f"{name}: {_AWQ_FULL if ledger.full else _AWQ_UPDATE}")


#: per family, the per-expert suffixes accepted as written (ModelOpt also takes the `weight_packed` spelling)
_ALLOWED = {
    family: suffixes | ({"weight_packed"} if family == MODELOPT else set()) for family, suffixes in FAMILIES.items()
}


def usable_scale(value: float) -> bool:
    """Global and input scales must be finite and > 0: zeros make vLLM emit NaN or one repeated token."""
    return 0.0 < value < math.inf  # NaN compares false


def _other_family(suffix: str, family: str) -> str | None:
    for name, suffixes in FAMILIES.items():
        if name != family and suffix in suffixes and suffix not in FAMILIES[family]:
            return name
    return None


def check_tensor(ledger: Ledger, name: str, parsed: ExpertName | None) -> CheckpointError | None:
    """A problem with this tensor that must stop it before it reaches vLLM, or None."""
    if parsed is None:
        if name.endswith("." + AWQ_SUFFIX) and not (ledger.awq and name.endswith(_AWQ_ATTENTION)):
            return _awq(ledger, name)
        return None
    if parsed.layout == FUSED:
        if ledger.layers:
            prefix = next(iter(ledger.layers))
            return MixedLayoutError(
                name,
                f"{name} is a fused 3-D expert tensor, but {prefix} holds per-expert tensors: "
                "one model must use one expert layout; re-export the checkpoint in one layout",
            )
        return None
    if ledger.fused:
        fused = next(iter(ledger.fused.values()))
        return MixedLayoutError(
            name,
            f"{name} is a per-expert tensor, but {fused} is a fused 3-D expert tensor: "
            "one model must use one expert layout; re-export the checkpoint in one layout",
        )
    if parsed.suffix == AWQ_SUFFIX and not ledger.awq:
        return _awq(ledger, name)
    family = ledger.family
    if family is not None and parsed.suffix not in _ALLOWED[family] and parsed.suffix != AWQ_SUFFIX:
        other = _other_family(parsed.suffix, family)
        if other is not None:
            return MixedLayoutError(
                name,
                f"{name} has the {other} suffix {parsed.suffix!r} in a {family} checkpoint: the two "
                "families' scales mean different things (their global scales are reciprocals) and are "
                "never mixed; re-export the checkpoint with one tool",
            )
        return UnsupportedTensorError(
            name,
            f"{name} has suffix {parsed.suffix!r}, which no {family} NVFP4 expert carries "
            f"(expected one of {sorted(_ALLOWED[family])}); the checkpoint is damaged or from an unknown exporter",
        )
    if ledger.num_experts is not None and parsed.expert >= ledger.num_experts:
        return ExpertIndexError(
            name,
            f"{name} is expert {parsed.expert}, but the model has {ledger.num_experts} experts "
            f"(indices 0..{ledger.num_experts - 1}): fix num_experts in config.json or remove the stray tensor",
        )
    if ledger.has(parsed):
        layer = ledger.layers[parsed.prefix]
        other = next(iter(layer.layouts - {parsed.layout}), None)
        first = layer.name(parsed.expert, parsed.proj, parsed.suffix, other) if other else None
        where = f"already read as {first}" if first else "it appears in two shards"
        return DuplicateTensorError(
            name,
            f"{name} is a second copy of expert {parsed.expert} {parsed.proj}.{parsed.suffix} ({where}; the "
            "checkpoint holds this tensor twice, e.g. in both the legacy and the canonical layout): "
            "keep one copy and remove the other from the shards",
        )
    return None


def check_complete(
    ledger: Ledger, *, full: bool = True, experts: Collection[int] | None = None
) -> list[CheckpointError]:
    """Problems visible once the stream has passed: unusable scales, and gaps if ``full``.

    ``full``: the stream was a whole checkpoint.  Otherwise (a weight update) nothing is judged by
    what the call lacks, and a NaN scale passes: vLLM's sparse weight patches mark "unchanged" so.
    ``experts``: the only expert indices this process was handed (vLLM's expert-parallel weight
    filter skips the others before they are read); coverage of the rest is not judged.
    """
    problems = _coverage(ledger, experts) if full else []
    unusable = (lambda v: not 0.0 < v < math.inf) if full else (lambda v: v <= 0.0 or v == math.inf)
    for name, value in ledger.scalars(unusable):
        problems.append(
            UnusableScaleError(
                name,
                f"{name} = {value!r}: global and input scales must be one finite value > 0 (vLLM would emit NaN "
                "or one repeated token); recalibrate so this expert sees data, or re-export",
            )
        )
    return problems


def _coverage(ledger: Ledger, only: Collection[int] | None) -> list[CheckpointError]:
    problems: list[CheckpointError] = []
    for prefix, router in ledger.routers.items():
        if prefix not in ledger.layers and prefix not in ledger.fused:
            problems.append(
                MissingTensorError(
                    f"{prefix}.*",
                    f"{router} is a MoE router, but no expert tensor of {prefix} is in the checkpoint: "
                    "the shard holding them is missing; copy every shard listed in model.safetensors.index.json",
                )
            )
    experts = ledger.expected_experts()
    suffixes = ledger.suffixes()
    slots = [(proj, suffix, ledger.slot(proj, suffix)) for suffix in suffixes for proj in PROJECTIONS]
    slots = [(proj, suffix, slot) for proj, suffix, slot in slots if slot < STRIDE]  # the rest are not tracked
    full = ledger.full_mask()
    missing: list[str] = []
    for layer in ledger.layers.values():
        if layer.complete(full, experts) == experts:
            continue
        for expert in range(experts):
            if only is not None and expert not in only:
                continue
            mask = layer.mask(expert)
            if mask != full:
                missing.extend(layer.name(expert, p, s) for p, s, bit in slots if not mask >> bit & 1)
    if missing:
        total = len(missing)
        shown = ", ".join(missing[:5]) + (f" and {total - 5} more" if total > 5 else "")
        message = (
            f"{missing[0]} is missing: every MoE layer needs experts 0..{experts - 1} x "
            f"{{gate_proj, up_proj, down_proj}} x {{{', '.join(suffixes)}}}; {total} tensor(s) missing: "
            f"{shown}. Restore them from the original export (a shard may be incomplete)"
        )
        problems.append(MissingTensorError(missing[0], message))
    return problems


def summarize(problems: list[CheckpointError]) -> CheckpointError:
    """One exception for many problems: the first one's type and tensor, every message listed."""
    first = problems[0]
    if len(problems) == 1:
        return first
    listed = "\n  ".join(str(p) for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    error = type(first)(first.name, f"{len(problems)} checkpoint problems:\n  {listed}{more}")
    return error
