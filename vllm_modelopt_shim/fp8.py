"""fp8 e4m3fn block-scale arithmetic on uint8 codes: pure numpy, no state, no torch.

Multiplying fp8 block scales by a factor and rounding back maps each of the 256 codes to one code: a
factor is a 256-entry table, rescaling a tensor one gather.  The runtime (``harmonize.Folder``) and
``convert`` both fold through ``fold_many``: one truth for the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = ["FP8_MAX", "Folded", "fits", "fold_many", "rescale", "rescale_rows", "values"]

FP8_MAX = 448.0
#: block scales per expert whose histogram weighs the reported error (evenly strided over larger ones):
#: a real-size expert has 98,304 per half, and a full histogram per expert doubled the fold's time
SAMPLE = 1 << 12


@cache
def values() -> Any:
    """fp8 e4m3fn code (0..255) -> its value, float64 numpy (NaN for 0x7F and 0xFF)."""
    import numpy as np

    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exp, man = (code >> 3) & 0xF, code & 7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    return np.where((exp == 15) & (man == 7), np.nan, sign * mag)


def encode(x: Any) -> Any:
    """float64 values (finite, |x| <= 448, or NaN) -> the nearest fp8 e4m3fn codes, ties to even, as uint8."""
    import numpy as np

    ladder = values()[:127]  # codes 0..126: every finite non-negative value, ascending
    mag = np.abs(np.nan_to_num(x))
    hi = np.clip(np.searchsorted(ladder, mag), 1, 126)
    lo = hi - 1
    down, up = mag - ladder[lo], ladder[hi] - mag
    code = np.where((down < up) | ((down == up) & (lo % 2 == 0)), lo, hi)
    code = np.where(mag <= 0, 0, code) | np.where(np.signbit(x), 0x80, 0)
    return np.where(np.isnan(x), 0x7F | np.where(np.signbit(x), 0x80, 0), code).astype(np.uint8)


def tables(ratios: Any) -> tuple[Any, Any]:
    """Per ratio (> 0), the table code -> code of its value times the ratio (rounded, at most 448 in
    magnitude), and the exact products of codes 0..127.  One vectorized pass for a whole batch, on the
    non-negative half: negating a value negates its rounding, so code | 0x80 maps to the table's | 0x80."""
    import numpy as np

    exact = values()[None, :128] * np.asarray(ratios, dtype=np.float64)[:, None]
    half = encode(np.minimum(exact, FP8_MAX))
    half[:, 0x7F] = 0x7F  # NaN stays the NaN it was
    return np.concatenate([half, half | 0x80], axis=1), exact


def gather(table: Any, codes: Any) -> Any:
    """``table[codes]`` for a 256-entry uint8 table, via bytes.translate (faster than numpy's gather);
    copied out of the bytearray so the result is one plain array, not a view holding a buffer."""
    import numpy as np

    out = bytearray(np.ascontiguousarray(codes)).translate(table.tobytes())
    return np.frombuffer(out, dtype=np.uint8).reshape(codes.shape).copy()


def rescale(codes: Any, ratio: float) -> Any:
    """fp8 codes times ``ratio``, rounded to fp8 (at most 448)."""
    return gather(tables([ratio])[0][0], codes)


def rescale_rows(codes: Any, factors: Any) -> Any:
    """fp8 codes [rows, cols] with row r times ``factors[r]``, each product rounded once to fp8 (at most
    448; ties to even).  The product is formed in float32 (exact: 4 significant bits times 24 fit in
    28, rounded once to float32, which never moves a value across an fp8 rounding boundary but at an
    exact tie, where float32 holds it exactly).  Bit arithmetic on float32: no searchsorted, no tables."""
    import numpy as np

    f32 = values().astype(np.float32)
    x = f32[codes] * np.asarray(factors, dtype=np.float32)[:, None]
    mag = np.minimum(np.abs(x), np.float32(FP8_MAX))  # NaN stays NaN
    nan = np.isnan(mag)
    if nan.any():
        mag[nan] = 0.0
    bits = mag.view(np.uint32)
    # normal range (>= 2**-6): drop 20 mantissa bits, ties to even; rebias the exponent (127 -> 7)
    normal = ((bits + np.uint32(0x7FFFF) + ((bits >> 20) & np.uint32(1))) >> 20) - np.uint32(120 << 3)
    subnormal = np.rint(mag * np.float32(512.0)).astype(np.uint32)  # multiples of 2**-9, ties to even
    code = np.where(mag < np.float32(2.0**-6), subnormal, normal).astype(np.uint8)
    code |= np.signbit(x).astype(np.uint8) << 7
    if nan.any():
        code[nan] |= 0x7F
    return code


def row_tops(codes: Any) -> Any:
    """The largest finite non-negative value in each row of fp8 codes (0 for none)."""
    import numpy as np

    highest = codes.max(axis=1)
    tops = values()[highest]
    odd = highest >= 0x7F  # a NaN or a negative value: the slow way, row by row
    for r in np.flatnonzero(odd):
        tops[r] = top(codes[r])
    return tops


def fits(codes: Any, ratio: float) -> bool:
    """Whether block scales times ``ratio`` stay finite and within fp8 (at most 448)."""
    top = float(values()[int(codes.max())]) if codes.size else 0.0
    return math.isfinite(top) and top >= 0 and top * ratio <= FP8_MAX


def counts(codes: Any) -> Any:
    """How often each code occurs, in all block scales or an even sample of ``SAMPLE`` or more (it only
    weighs the reported error; the bytes written never depend on it)."""
    import numpy as np

    flat = codes.reshape(-1)
    return np.bincount(flat[:: max(1, flat.size // SAMPLE)], minlength=256)


def top(codes: Any) -> float:
    """The largest finite value among block scales (0 if none)."""
    import numpy as np

    highest = int(codes.max()) if codes.size else 0
    if highest < 0x7F:  # non-negative finite codes rise with their values
        return float(values()[highest])
    present = values()[np.bincount(codes.reshape(-1), minlength=256) > 0]  # a NaN or a negative value
    finite = present[np.isfinite(present)]
    return max(float(finite.max()), 0.0) if finite.size else 0.0


def errors(table: Any, exact: Any, count: Any) -> Any:
    """Relative L2 error of each row's rounding, every code weighted by how often it occurs (``count``
    per code 0..255; a negative value's error is its magnitude's)."""
    import numpy as np

    vals = values()[:128]
    finite = np.isfinite(vals)
    count = count[:, :128] + count[:, 128:]
    diff = np.where(finite, vals[table[:, :128]] - exact, 0.0)
    norm = (count * np.where(finite, exact * exact, 0.0)).sum(axis=1)
    sq = (count * diff * diff).sum(axis=1)
    return np.where(norm > 0, np.sqrt(sq / np.where(norm > 0, norm, 1.0)), 0.0)


@dataclass(slots=True)
class Folded:
    """One expert's w13 after the fold: new block scale codes per half, the common global scale as stored,
    gate's power-of-two shift, and up's relative error before and the worse half's after."""

    gate: Any
    up: Any
    common: float
    shift: int
    before: float
    after: float


def fold_many(
    experts: Sequence[tuple[Any, Any, float, float]],
    *,
    reciprocal: bool,
    rows: Sequence[Any | None] | None = None,
    rescale_rows: Callable[[Any, Any], Any] = rescale_rows,
) -> list[Folded | None]:
    """Fold a batch of experts, each ``(gate codes, up codes, gate global, up global as stored)``.

    The common scale is ``gate * 2**k`` with the smallest ``k >= 0`` that keeps up's largest block scale,
    rescaled by ``up / common``, within 448: gate's block scales are divided by ``2**k`` (exact but for
    subnormals; ``k = 0``, the usual case, leaves gate as it is), up's multiplied by ``up / common``.
    ``rows`` (NVFP4_AWQ): per expert, None or down_proj's ``pre_quant_scale`` (float, one per up row),
    which up's row r also takes (``silu(gate) * up`` times p is what down expects); such an expert is
    folded even with equal global scales, in one rounding per block scale.
    ``rescale_rows``: the row rounding (the runtime passes torch's fp8 cast, equal and 7x faster).
    ``reciprocal``: compressed-tensors, whose global scale divides.  None for an expert with nothing to
    do: equal global scales and no rows, scales that are not one finite value > 0 (verify reports
    those), block scales of two shapes.  The tables are made once per batch.
    """
    import numpy as np

    rows = rows if rows is not None else [None] * len(experts)
    out: list[Folded | None] = [None] * len(experts)
    todo = [
        i
        for i, (gate, up, g, u) in enumerate(experts)
        if (g != u or rows[i] is not None)
        and gate.shape == up.shape
        and 0.0 < g < math.inf  # NaN compares false
        and 0.0 < u < math.inf
    ]
    if not todo:
        return out
    n = len(todo)
    stored = np.array([experts[i][2] for i in todo], dtype=np.float64)
    g = 1.0 / stored if reciprocal else stored
    u = np.array([experts[i][3] for i in todo], dtype=np.float64)
    u = 1.0 / u if reciprocal else u
    factors = [None if rows[i] is None else np.asarray(rows[i], dtype=np.float64) for i in todo]
    highest = np.array(
        [
            top(experts[i][1]) if f is None else float((row_tops(experts[i][1]) * f).max(initial=0.0))
            for i, f in zip(todo, factors, strict=True)
        ]
    )
    shift = np.zeros(n, dtype=np.int64)
    while True:  # the smallest k >= 0 that keeps up's largest block scale within fp8
        over = u * highest / np.ldexp(g, shift) > FP8_MAX
        if not over.any():
            break
        shift += over
    scale = np.ldexp(1.0, shift)
    common = stored / scale if reciprocal else stored * scale  # exact: a power of two
    moved = [j for j in range(n) if shift[j]]
    plain = [j for j in range(n) if factors[j] is None]  # up takes one factor: a table
    table, products = tables(np.concatenate([u[plain] / (g[plain] * scale[plain]), 1.0 / scale[moved]]))
    after = np.zeros(n)
    if plain:
        up_counts = np.stack([counts(experts[todo[j]][1]) for j in plain])
        after[plain] = errors(table[: len(plain)], products[: len(plain)], up_counts)
    gate_after = np.zeros(n)
    if moved:
        gate_counts = np.stack([counts(experts[todo[j]][0]) for j in moved])
        gate_after[moved] = errors(table[len(plain) :], products[len(plain) :], gate_counts)
    up_table = dict(zip(plain, table[: len(plain)], strict=True))
    gate_table = dict(zip(moved, table[len(plain) :], strict=True))
    before = np.abs(g - u) / u
    for j, i in enumerate(todo):
        gate, up = experts[i][0], experts[i][1]
        new_gate = gather(gate_table[j], gate) if j in gate_table else gate
        if factors[j] is None:
            new_up = gather(up_table[j], up)
        else:
            ratio = u[j] * factors[j] / (g[j] * scale[j])
            new_up = rescale_rows(up, ratio)
            after[j] = _row_error(up, new_up, ratio)
        worst = max(float(after[j]), float(gate_after[j]))
        out[i] = Folded(new_gate, new_up, float(common[j]), int(shift[j]), float(before[j]), worst)
    return out


def _row_error(codes: Any, new: Any, ratio: Any) -> float:
    """Relative L2 error of ``new`` against the exact row-scaled ``codes`` (an even sample of rows; NaN
    codes count as 0)."""
    import numpy as np

    step = max(1, codes.shape[0] * max(1, codes.shape[1]) // SAMPLE)
    finite = _finite()
    exact = finite[codes[::step]] * ratio[::step, None]
    diff = finite[new[::step]] - exact
    norm = float(np.vdot(exact, exact))
    return math.sqrt(float(np.vdot(diff, diff)) / norm) if norm > 0 else 0.0


@cache
def _finite() -> Any:
    """``values()`` with NaN as 0."""
    import numpy as np

    return np.nan_to_num(values())
