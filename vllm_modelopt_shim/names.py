"""Expert tensor names: the three layouts, the two suffix families, and the rename.

Pure string logic (no torch, no vLLM) so it is testable in microseconds and shared by
the runtime patch and the ``doctor`` command.

Layouts of one MoE layer's experts in a checkpoint:

- ``legacy``    ``<prefix>.experts.<proj>.<N>.<suffix>``  (ModelOpt + transformers 4.57)
- ``canonical`` ``<prefix>.experts.<N>.<proj>.<suffix>``  (what vLLM expects)
- ``fused``     ``<prefix>.experts.gate_up_proj`` / ``.down_proj`` 3-D (bf16 HF, re-fused exports)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "LEGACY",
    "CANONICAL",
    "FUSED",
    "PROJECTIONS",
    "MODELOPT",
    "COMPRESSED",
    "UNQUANTIZED",
    "FAMILIES",
    "SCALAR_SUFFIXES",
    "AWQ_SUFFIX",
    "ExpertName",
    "family_of",
    "parse",
    "canonical",
    "canonical_suffix",
    "rename",
    "legacy",
]

LEGACY = "legacy"
CANONICAL = "canonical"
FUSED = "fused"

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

#: quant family -> the per-expert suffixes it writes.
MODELOPT = "modelopt"
COMPRESSED = "compressed-tensors"
UNQUANTIZED = "unquantized"
FAMILIES: dict[str, frozenset[str]] = {
    MODELOPT: frozenset({"weight", "weight_scale", "weight_scale_2", "input_scale"}),
    COMPRESSED: frozenset({"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"}),
    UNQUANTIZED: frozenset({"weight", "bias"}),
}
#: 0-D (ModelOpt) or [1] (compressed-tensors) per-tensor scales: must be finite and > 0.
SCALAR_SUFFIXES = frozenset({"weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale"})
#: NVFP4_AWQ smoothing factors: no vLLM release applies them.
AWQ_SUFFIX = "pre_quant_scale"
#: The one crossing allowed between families: the bug report's ModelOpt export spells the
#: packed weight the compressed-tensors way; in a ModelOpt model it means ``weight``.
_PACKED = "weight_packed"

_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:[._](?P<suffix>[A-Za-z]\w*))?$")


def family_of(quant_method: str | None) -> str | None:
    """Map a quantization method name (config.json or vLLM's) to a suffix family, or None if unknown."""
    if not quant_method:
        return UNQUANTIZED
    method = quant_method.lower().replace("_", "-")
    if method.startswith("modelopt"):
        return MODELOPT
    if method.startswith("compressed-tensors"):
        return COMPRESSED
    return None


@dataclass(slots=True)
class ExpertName:
    """One parsed expert tensor name; ``expert`` is -1 for fused 3-D tensors."""

    prefix: str
    expert: int
    proj: str
    suffix: str
    layout: str


_PROJ_SET = frozenset(PROJECTIONS)
#: what follows ``.experts.`` -> (expert, proj, suffix, layout), or () when only the full parse can say.
#: The same tails recur in every MoE layer, so a load parses each once (a few thousand at most).
_TAILS: dict[str, tuple[int, str, str, str] | tuple[()]] = {}
_MOST_TAILS = 1 << 16


def _tail(tail: str) -> tuple[int, str, str, str] | tuple[()]:
    parts = tail.split(".")
    if len(parts) == 3:
        a, b, suffix = parts
        if suffix.isidentifier() and suffix.isascii():
            if a in _PROJ_SET and b.isdigit() and b.isascii():
                return (int(b), a, suffix, LEGACY)
            if b in _PROJ_SET and a.isdigit() and a.isascii():
                return (int(a), b, suffix, CANONICAL)
    return ()


def parse(name: str) -> ExpertName | None:
    """Parse an expert tensor name in any layout; None for every other tensor.

    Hot path (73,728 expert tensors in a 30B-A3B load): the part after ``.experts.`` is looked up in
    a table that each distinct tail enters once; anything else takes ``_parse``.
    """
    at = name.find(".experts.")
    if at <= 0:
        return None if at < 0 else _parse(name)
    tail = name[at + 9 :]
    hit = _TAILS.get(tail)
    if hit is None:
        hit = _tail(tail)
        if len(_TAILS) < _MOST_TAILS:
            _TAILS[tail] = hit
    if hit:
        return ExpertName(name[: at + 8], *hit)
    return _parse(name)


def _parse(name: str) -> ExpertName | None:
    """The full parse, for names whose tail alone does not decide."""
    if ".experts." not in name:
        return None
    parts = name.rsplit(".", 3)
    if len(parts) == 4:
        head, a, b, suffix = parts
        if head.endswith(".experts") and len(head) > 8 and suffix.isidentifier() and suffix.isascii():
            if a in _PROJ_SET and b.isdigit() and b.isascii():
                return ExpertName(head, int(b), a, suffix, LEGACY)
            if b in _PROJ_SET and a.isdigit() and a.isascii():
                return ExpertName(head, int(a), b, suffix, CANONICAL)
    m = _FUSED.match(name)
    if m is not None:
        return ExpertName(m.group("prefix"), -1, m.group("proj"), m.group("suffix") or "", FUSED)
    return None


def canonical_suffix(suffix: str, family: str | None) -> str:
    return "weight" if family == MODELOPT and suffix == _PACKED else suffix


def canonical(name: str, family: str | None = MODELOPT) -> str:
    """The name vLLM expects for ``name``; every name that needs no change is returned as is.

    Idempotent: ``canonical(canonical(n)) == canonical(n)``.
    """
    return rename(name, parse(name), family)


def rename(name: str, parsed: ExpertName | None, family: str | None) -> str:
    """``canonical`` for a name already parsed (the stream parses each name once)."""
    if parsed is None or parsed.layout == FUSED:
        if family == MODELOPT and name.endswith("." + _PACKED):
            return name[: -len(_PACKED)] + "weight"
        return name
    suffix = parsed.suffix
    if suffix == _PACKED and family == MODELOPT:
        suffix = "weight"
    return f"{parsed.prefix}.{parsed.expert}.{parsed.proj}.{suffix}"


def legacy(name: str) -> str:
    """The ModelOpt transformers-4.57 spelling of an expert name (inverse of the layout part of ``canonical``)."""
    parsed = parse(name)
    if parsed is None or parsed.layout == FUSED:
        return name
    return f"{parsed.prefix}.{parsed.proj}.{parsed.expert}.{parsed.suffix}"
