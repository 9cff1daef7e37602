"""NVFP4_AWQ's ``pre_quant_scale`` folded into tensors vLLM does use: the arithmetic, pure numpy.

ModelOpt's AWQ computes ``y = quant(x * p) @ dequant(W / p).T``; no vLLM release multiplies by p.
Each fold moves p where vLLM computes it anyway, without touching one e2m1 payload:

- down_proj's p into up_proj's fp8 block-scale rows (``fp8.fold_many`` with ``rows``): down's input
  is ``silu(gate(x)) * up(x)``, and up's row r times ``p[r]`` makes it ``h * p``; exact but for fp8.
- a MoE layer's gate/up p: their mean ``p_bar`` over the layer's experts into
  ``post_attention_layernorm.weight`` (its only reader is the MoE block), the router's columns
  divided by it (bf16); each expert's ``p / p_bar`` is the residual left.
- o_proj's p: its mean over the query heads of each KV group into v_proj's output rows, through v's
  block scales; a power of two that keeps them within fp8 moves to o_proj's global scale (o_proj is
  fused with nothing); the heads' ``p / mean`` is the residual left.

The runtime (``awqfold``) and ``convert`` both call these: the bytes cannot differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import fp8
from .errors import MissingTensorError, UnusableScaleError

__all__ = [
    "ALGO",
    "AttentionFold",
    "Shapes",
    "Tally",
    "as_nvfp4",
    "check",
    "is_awq_config",
    "needed",
    "common",
    "from_bits",
    "group_mean",
    "group_residual",
    "residual",
    "scale_columns",
    "to_bits",
    "vector",
]


#: tails of the tensors the folds read or change, per decoder layer (``<...>.layers.<N>`` + tail)
NORM, ROUTER = ".post_attention_layernorm.weight", ".mlp.gate.weight"
O_P, O_GLOBAL, V_BLOCK = (
    ".self_attn.o_proj.pre_quant_scale",
    ".self_attn.o_proj.weight_scale_2",
    ".self_attn.v_proj.weight_scale",
)
EXPERTS = ".mlp.experts"

#: the quant_algo ModelOpt writes for NVFP4_AWQ_LITE/FULL/CLIP exports, and what vLLM is told instead
ALGO, NVFP4 = "NVFP4_AWQ", "NVFP4"


def is_awq_config(config: Any) -> bool:
    """Whether a ModelOpt quantization config (config.json's quantization_config or hf_quant_config.json,
    as a dict) says NVFP4_AWQ."""
    if not isinstance(config, Mapping):
        return False
    inner = config.get("quantization")
    algo = inner.get("quant_algo") if isinstance(inner, Mapping) else config.get("quant_algo")
    return isinstance(algo, str) and algo.strip().upper() == ALGO


def as_nvfp4(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose quant_algo says NVFP4 (and no pre_quant_scale), the rest as written."""
    out = dict(config)
    inner = out.get("quantization")
    if isinstance(inner, Mapping):
        out["quantization"] = {k: v for k, v in {**inner, "quant_algo": NVFP4}.items() if k != "pre_quant_scale"}
    else:
        out["quant_algo"] = NVFP4
    return out


@dataclass(slots=True)
class Tally:
    """What the AWQ folds of one load did: p tensors folded exactly (up to fp8 rounding of block scales)
    or with a residual left, and the worst residual ``max |p / folded - 1|``."""

    exact: int = 0
    residual: int = 0
    worst: float = 0.0
    where: str = ""  # the p tensor with the worst residual
    unapplied: int = 0  # p tensors whose fold never got its partners (a layer without norm or router)

    def add(self, name: str, left: float) -> None:
        if left == 0.0:
            self.exact += 1
            return
        self.residual += 1
        if left > self.worst:
            self.worst, self.where = left, name

    def __str__(self) -> str:
        worst = f"; worst residual {100 * self.worst:.1f}% ({self.where})" if self.residual else ""
        lost = f"; {self.unapplied} NOT applied (their layer's norm or router never came)" if self.unapplied else ""
        return (
            f"NVFP4_AWQ: folded {self.exact + self.residual} pre_quant_scale tensors, {self.exact} exactly "
            f"(up to fp8 rounding), {self.residual} with a residual{worst}{lost}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "folded": self.exact + self.residual,
            "exact": self.exact,
            "with_residual": self.residual,
            "worst_residual": round(self.worst, 6),
            "worst_tensor": self.where or None,
            "unapplied": self.unapplied,
        }


def needed(name: str, by: str) -> MissingTensorError:
    """``name`` is missing, and the fold of ``by`` (a pre_quant_scale) changes it."""
    return MissingTensorError(
        name, f"{name} is missing, and folding {by} (NVFP4_AWQ) changes it: restore it from the original export"
    )


def check(name: str, proj: str, values: Any, expected: int) -> UnusableScaleError | None:
    """A ``pre_quant_scale`` that cannot be folded: not a float vector of the projection's input length
    (``expected``; 0: unknown), or a value that is not finite and > 0.  ``values``: float32 numpy, or
    None for a non-float dtype."""
    import numpy as np

    if values is None or values.ndim != 1 or (expected and values.shape[0] != expected):
        shape = None if values is None else tuple(values.shape)
        return UnusableScaleError(
            name,
            f"{name} (shape {shape}) is not what a {proj} pre_quant_scale is, a float vector of "
            f"{expected or 'its input'} values: the checkpoint is damaged; re-export it",
        )
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return UnusableScaleError(
            name,
            f"{name}[{i}] = {float(values[i])!r}: every pre_quant_scale value must be finite and > 0 (the exported "
            "weight's input column was divided by it); the checkpoint is damaged; re-export it",
        )
    return None


def from_bits(raw: Any, dtype: str) -> Any:
    """A bf16 (uint16 bits), float16 or float32 numpy array as float32."""
    import numpy as np

    if dtype == "bfloat16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw).astype(np.float32)


def to_bits(x: Any, dtype: str) -> Any:
    """float32 -> ``dtype`` (bf16 as uint16 bits), rounded to nearest, ties to even; NaN stays NaN."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "bfloat16":
        return x.astype(np.float16 if dtype == "float16" else np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


@dataclass(slots=True, frozen=True)
class Shapes:
    """The lengths p must have, from the model's text config (0: unknown, not checked)."""

    hidden: int = 0
    moe_intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def of(cls, get: Any) -> Shapes:
        """From ``get(key) -> value`` over a text config (config.json's dict or transformers' object)."""

        def num(key: str) -> int:
            value = get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        heads = num("num_attention_heads")
        head_dim = num("head_dim") or (num("hidden_size") // heads if heads else 0)
        return cls(num("hidden_size"), num("moe_intermediate_size"), heads, num("num_key_value_heads"), head_dim)

    def length(self, proj: str) -> int:
        if proj in ("gate_proj", "up_proj"):
            return self.hidden
        if proj == "down_proj":
            return self.moe_intermediate
        return self.heads * self.head_dim  # o_proj


def common(ps: Mapping[tuple[str, int], Any]) -> Any:
    """A MoE layer's gate/up p mean, by (projection, expert): float32, summed in float64 in sorted key
    order, so any arrival order gives the same bytes."""
    import numpy as np

    keys = sorted(ps)
    total = np.zeros(len(ps[keys[0]]), dtype=np.float64)
    for key in keys:
        total += ps[key]
    return (total / len(keys)).astype(np.float32)


def residual(p: Any, folded: Any) -> float:
    """``max |p / folded - 1|``: what of p stays unapplied where ``folded`` was applied instead."""
    import numpy as np

    return float(np.max(np.abs(p.astype(np.float64) / folded.astype(np.float64) - 1.0), initial=0.0))


def scale_columns(x: Any, factors: Any, *, divide: bool = False) -> Any:
    """float32 ``x`` [..., n] times (or divided by) ``factors`` [n], in float32."""
    import numpy as np

    f = np.asarray(factors, dtype=np.float32)
    return (x / f) if divide else (x * f)


def group_mean(p: Any, heads: int, kv_heads: int) -> Any:
    """o_proj's p [heads x head_dim] -> its mean over the query heads of each KV group [kv_heads x head_dim]."""
    import numpy as np

    head_dim = len(p) // heads
    grouped = np.asarray(p, dtype=np.float64).reshape(kv_heads, heads // kv_heads, head_dim)
    return grouped.mean(axis=1).reshape(-1).astype(np.float32)


def group_residual(p: Any, heads: int, kv_heads: int) -> float:
    """o_proj's p against its KV groups' means: what of it the v fold leaves (``residual``)."""
    import numpy as np

    mean = group_mean(p, heads, kv_heads)
    spread = np.repeat(mean.reshape(kv_heads, 1, -1), heads // kv_heads, axis=1).reshape(-1)
    return residual(np.asarray(p, dtype=np.float32), spread)


def vector(raw: bytes, dtype: str) -> Any:
    """A safetensors tensor's bytes (dtype as the header spells it) as float32 numpy; None if not a float."""
    import numpy as np

    if dtype == "BF16":
        return from_bits(np.frombuffer(raw, dtype="<u2"), "bfloat16")
    kind = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}.get(dtype)
    return None if kind is None else np.frombuffer(raw, dtype=kind).astype(np.float32)


@dataclass(slots=True)
class AttentionFold:
    """One attention's o_proj p folded: v_proj's new block-scale codes, the power of two o_proj's global
    scale takes, and the residual ``max |p / group mean - 1|``."""

    v_codes: Any
    shift: int
    left: float

    @classmethod
    def of(cls, p_o: Any, v_codes: Any, heads: int, kv_heads: int) -> AttentionFold:
        """Fold ``p_o`` (float32 [heads x head_dim]) into v's block-scale codes [kv_heads x head_dim, k/16]."""
        import numpy as np

        mean = group_mean(p_o, heads, kv_heads)
        if len(mean) != v_codes.shape[0]:
            raise ValueError(f"o_proj's p gives {len(mean)} rows of v_proj, which has {v_codes.shape[0]}")
        factors = mean.astype(np.float64)
        top = float((fp8.row_tops(v_codes) * factors).max(initial=0.0))
        shift = 0
        while top / 2.0**shift > fp8.FP8_MAX:  # the smallest power of two that keeps v within fp8
            shift += 1
        codes = fp8.rescale_rows(v_codes, factors / 2.0**shift)
        return cls(codes, shift, group_residual(p_o, heads, kv_heads))
