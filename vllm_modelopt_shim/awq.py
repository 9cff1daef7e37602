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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import fp8

__all__ = ["AttentionFold", "Tally", "common", "from_bits", "group_mean", "residual", "scale_columns", "to_bits"]


@dataclass(slots=True)
class Tally:
    """What the AWQ folds of one load did: p tensors folded exactly (up to fp8 rounding of block scales)
    or with a residual left, and the worst residual ``max |p / folded - 1|``."""

    exact: int = 0
    residual: int = 0
    worst: float = 0.0
    where: str = ""  # the p tensor with the worst residual

    def add(self, name: str, left: float) -> None:
        if left == 0.0:
            self.exact += 1
            return
        self.residual += 1
        if left > self.worst:
            self.worst, self.where = left, name

    def __str__(self) -> str:
        worst = f"; worst residual {100 * self.worst:.1f}% ({self.where})" if self.residual else ""
        return (
            f"NVFP4_AWQ: folded {self.exact + self.residual} pre_quant_scale tensors, {self.exact} exactly "
            f"(up to fp8 rounding), {self.residual} with a residual{worst}"
        )


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


def common(ps: Sequence[Any]) -> Any:
    """The mean of equal-length p vectors (float32 result, summed in float64 in the order given)."""
    import numpy as np

    total = np.zeros(len(ps[0]), dtype=np.float64)
    for p in ps:
        total += p
    return (total / len(ps)).astype(np.float32)


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
        spread = np.repeat(mean.reshape(kv_heads, 1, -1), heads // kv_heads, axis=1).reshape(-1)
        return cls(codes, shift, residual(np.asarray(p_o, dtype=np.float32), spread))
