"""Give gate and up of each expert one global scale, folding the ratio into the fp8 block scales.

vLLM fuses gate_proj and up_proj into w13 and, after loading, dequantizes both halves with the
gate's global scale (ModelOpt ``weight_scale_2[:, 0]``; compressed-tensors
``weight_global_scale[:, 0]``, the reciprocal).  ModelOpt's per-expert export often gives the two
different scales, so up_proj would be dequantized that far off.

The fold acts on the checkpoint tensors as they stream past, before vLLM copies them (vLLM's
layerwise reload processes a layer for its kernels inside ``load_weights``, so afterwards is too
late).  ``Folder`` holds an expert's gate/up block and global scales (copies: some readers reuse
their buffers) until all four have passed, then emits them folded:

- the common scale is ``c = gate * 2**k`` with the smallest ``k >= 0`` that keeps up's largest
  block scale, rescaled by ``up / c``, within fp8 e4m3's maximum (448);
- gate's block scales are divided by ``2**k``: exact in fp8 (``k = 0``, the usual case, leaves
  gate untouched); up's are multiplied by ``up / c`` and rounded to fp8.

It depends on the four scale tensors alone, so any split of a checkpoint over ``load_weights``
calls gives the same bytes: pieces still waiting when a call ends are emitted as they are (and
emitted again, folded, once their partners arrive).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FP8_MAX", "Folder", "Result", "fold", "fold_codes"]

FP8_MAX = 448.0
#: the four pieces of one expert the fold needs: (projection, kind)
_PIECES = frozenset({("gate_proj", "block"), ("gate_proj", "global"), ("up_proj", "block"), ("up_proj", "global")})


class Result:
    """What the folds of one load did: experts seen and changed, the worst relative error before and after."""

    __slots__ = ("experts", "harmonized", "left", "worst_after", "worst_before")

    def __init__(self) -> None:
        self.experts = 0  # experts whose four scale pieces met
        self.harmonized = 0  # of those, changed
        self.left = 0  # experts whose pieces never met (emitted as they are)
        self.worst_before = 0.0  # of up_proj dequantized with gate's scale (vLLM without the fold)
        self.worst_after = 0.0  # of either half after the fold

    def __str__(self) -> str:
        left = f"; {self.left} left as they are (gate and up too far apart in the stream)" if self.left else ""
        return (
            f"harmonized gate/up global scales of {self.harmonized} of {self.experts} experts: worst relative "
            f"error {100 * self.worst_before:.1f}% -> {100 * self.worst_after:.1f}% (fp8 rounding){left}"
        )


class Folded:
    """One expert's folded w13 scales: new block scales per half (codes, or tensors from ``fold``) and the
    common global scale as stored."""

    __slots__ = ("after", "before", "common", "gate", "shift", "up")

    def __init__(self, gate: Any, up: Any, common: float, shift: int, before: float, after: float) -> None:
        self.gate, self.up, self.common, self.shift = gate, up, common, shift
        self.before, self.after = before, after


_VALUES: list[Any] = []


def _values() -> Any:
    """fp8 e4m3fn code (0..255) -> its value, float64 numpy (NaN for 0x7F and 0xFF)."""
    if not _VALUES:
        import numpy as np

        code = np.arange(256)
        sign = np.where(code & 0x80, -1.0, 1.0)
        exp, man = (code >> 3) & 0xF, code & 7
        mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
        _VALUES.append(np.where((exp == 15) & (man == 7), np.nan, sign * mag))
    return _VALUES[0]


def _encode(x: Any) -> Any:
    """float64 values (finite, |x| <= 448, or NaN) -> the nearest fp8 e4m3fn codes, ties to even, as uint8."""
    import numpy as np

    ladder = _values()[:127]  # codes 0..126: every finite non-negative value, ascending
    mag = np.abs(np.nan_to_num(x))
    hi = np.clip(np.searchsorted(ladder, mag), 1, 126)
    lo = hi - 1
    down, up = mag - ladder[lo], ladder[hi] - mag
    code = np.where((down < up) | ((down == up) & (lo % 2 == 0)), lo, hi)
    code = np.where(mag <= 0, 0, code) | np.where(np.signbit(x), 0x80, 0)
    return np.where(np.isnan(x), 0x7F | np.where(np.signbit(x), 0x80, 0), code).astype(np.uint8)


def _rescale(codes: Any, ratio: float, *, exact_if_normal: int = 0) -> tuple[Any, float]:
    """fp8 codes (uint8 numpy) times ``ratio``, rounded to fp8 (at most 448); and the relative L2 error.

    An fp8 tensor holds one of 256 values per byte, so both go through 256-entry tables: one
    histogram and one gather over the bytes, in numpy (single-threaded and zero-copy: torch's
    multi-threaded kernels on small tensors cost ten times more inside a busy vLLM process).
    ``exact_if_normal=k`` (``ratio`` is 2**-k): when every code stays a normal number the rounding
    is exact and the histogram is skipped.
    """
    import numpy as np

    values = _values()
    exact = values * ratio
    table = _encode(np.minimum(exact, FP8_MAX))
    table[0x7F], table[0xFF] = 0x7F, 0xFF  # NaN stays the NaN it was
    out = np.take(table, codes)
    if exact_if_normal and codes.size and int(codes.max()) < 0x80:  # non-negative, as block scales are
        low = int(codes.min())
        if low == 0:  # zero stays zero: the smallest non-zero code decides
            nonzero = codes[codes != 0]
            low = int(nonzero.min()) if nonzero.size else 0x7F
        if low >> 3 > exact_if_normal:
            return out, 0.0  # every exponent stays >= 1: a power-of-two shift is exact
    counts = np.bincount(codes.reshape(-1), minlength=256)
    finite = np.isfinite(values)
    diff = np.where(finite, values[table] - exact, 0.0)
    norm = float((counts * np.where(finite, exact * exact, 0.0)).sum())
    return out, (math.sqrt(float((counts * diff * diff).sum()) / norm) if norm > 0 else 0.0)


def _largest(codes: Any) -> float:
    """The largest finite value among fp8 codes (block scales are >= 0: their codes are ordered as values)."""
    import numpy as np

    top = int(codes.max()) if codes.size else 0
    values = _values()
    if top < 0x7F:
        return float(values[top])
    present = values[np.bincount(codes.reshape(-1), minlength=256) > 0]
    present = present[np.isfinite(present)]
    return float(present.max()) if present.size else 0.0


def fold_codes(gate: Any, up: Any, g_stored: float, u_stored: float, *, reciprocal: bool) -> Folded | None:
    """Fold one expert given its block scales as fp8 codes (uint8 numpy arrays of one shape).

    ``reciprocal`` for compressed-tensors, whose global scale divides.  None when nothing is to be
    done: equal global scales, scales that are not one finite value > 0 (verify reports those), or
    block scales of two shapes.  The reported error is that of the block scales (each counted once).
    """
    if g_stored == u_stored or gate.shape != up.shape:
        return None
    if not all(math.isfinite(x) and x > 0 for x in (g_stored, u_stored)):
        return None
    g, u = (1.0 / g_stored, 1.0 / u_stored) if reciprocal else (g_stored, u_stored)
    top, shift = _largest(up), 0
    while u * top / (g * 2.0**shift) > FP8_MAX:
        shift += 1
    stored = g_stored / 2.0**shift if reciprocal else g_stored * 2.0**shift  # exact: a power of two
    new_up, err_up = _rescale(up, u / (g * 2.0**shift))
    new_gate, err_gate = _rescale(gate, 2.0**-shift, exact_if_normal=shift) if shift else (gate, 0.0)
    return Folded(new_gate, new_up, stored, shift, abs(g - u) / u, max(err_gate, err_up))


def _codes(t: Any) -> Any:
    return t.detach().cpu().contiguous().view(_torch().uint8).numpy()


def _tensor(codes: Any, like: Any) -> Any:
    torch = _torch()
    out = torch.from_numpy(codes).view(torch.float8_e4m3fn).reshape(like.shape)
    return out if like.device.type == "cpu" else out.to(like.device)


def _torch() -> Any:
    import torch

    return torch


def fold(gate: Any, up: Any, g_stored: float, u_stored: float, *, reciprocal: bool) -> Folded | None:
    """``fold_codes`` on torch fp8 tensors [I, K/16]: the new block scales come back as tensors."""
    f = fold_codes(_codes(gate), _codes(up), g_stored, u_stored, reciprocal=reciprocal)
    if f is not None:
        f.gate = gate if f.shift == 0 else _tensor(f.gate, gate)
        f.up = _tensor(f.up, up)
    return f


Pieces = dict[tuple[str, str], tuple[str, Any, float]]  # (proj, kind) -> (vLLM name, copy, value)
_ORDER = (("gate_proj", "block"), ("gate_proj", "global"), ("up_proj", "block"), ("up_proj", "global"))


class Folder:
    """The stream's side of the fold, kept per model across ``load_weights`` calls.

    ``take`` receives each gate/up block or global scale of an expert (vLLM name, tensor, value)
    and returns what to forward now: nothing while the expert's four pieces are incomplete (they
    wait, as copies: some readers reuse their buffers), all four, folded, once they are.
    ``flush`` (end of a call) forwards the pieces still waiting, as they are, and keeps them for a
    later call.  At most ``limit`` bytes wait (one MoE layer's gate and up block scales, from the
    first one seen); past that the oldest incomplete expert is let go as it is.  An internal error
    turns the folder off: everything waiting, and every later piece, passes as the checkpoint holds it.
    """

    def __init__(self, *, reciprocal: bool, num_experts: int | None) -> None:
        self.reciprocal = reciprocal
        self.num_experts = num_experts or 256
        self.waiting: dict[tuple[str, int], Pieces] = {}
        self.sent: dict[tuple[str, int], set[tuple[str, str]]] = {}  # pieces of waiting experts already forwarded
        #: expert -> (gate, up global scale as stored, shift, common scale as stored) of its last fold
        self.decided: dict[tuple[str, int], tuple[float, float, int, float]] = {}
        self.gone: set[tuple[str, int]] = set()  # let go over the bound: their pieces pass as they are
        self.bytes = 0
        self.limit: int | None = None
        self.result = Result()
        self.error: str | None = None

    def reset(self) -> None:
        """A full load starts: nothing of an earlier checkpoint may pair with this one's."""
        self._forget()
        self.decided.clear()
        self.gone.clear()
        self.result = Result()

    def take(
        self, prefix: str, expert: int, proj: str, kind: str, name: str, tensor: Any, value: float | None
    ) -> list[tuple[str, Any]]:
        key = (prefix, expert)
        if self.error is not None or key in self.gone or not self._fits(kind, tensor):
            return [(name, tensor)]
        try:
            if value is None:
                value = float(tensor.reshape(-1)[0])
            pieces = self.waiting.setdefault(key, {})
            old = pieces.get((proj, kind))
            if old is not None:  # a second copy (a later update): it replaces the first
                self.bytes -= old[1].nbytes
            copy = tensor.detach().clone()
            pieces[(proj, kind)] = (name, copy, value)
            self.sent.setdefault(key, set()).discard((proj, kind))
            self.bytes += copy.nbytes
            if self.limit is None and kind == "block":
                self.limit = 2 * self.num_experts * copy.nbytes
            if len(pieces) == len(_ORDER):
                return self._complete(key)
            out: list[tuple[str, Any]] = []
            while self.limit is not None and self.bytes > self.limit and len(self.waiting) > 1:
                out.extend(self._let_go(next(iter(self.waiting))))
            return out
        except Exception as exc:  # our bug: never break a load over the fold
            return self._fail(exc, [(name, tensor)])

    def flush(self) -> list[tuple[str, Any]]:
        """End of a call: forward every waiting piece not yet forwarded, and keep it waiting.

        A piece of an expert folded before (a later weight update) is forwarded as that fold had
        it, so the expert's block scales and global scale keep agreeing; any other as it is.
        """
        out = []
        try:
            for key, pieces in self.waiting.items():
                sent = self.sent.setdefault(key, set())
                for piece, (name, copy, value) in pieces.items():
                    if piece not in sent:
                        out.append((name, self._as_decided(key, piece, copy, value)))
                        sent.add(piece)
        except Exception as exc:
            return self._fail(exc, out)
        return out

    def drop(self) -> list[tuple[str, Any]]:
        """End of a full load: like ``flush``, then forget what never met its partners."""
        out = self.flush()
        self.result.left += len(self.waiting)
        self._forget()
        return out

    # -- inside --------------------------------------------------------------------------------
    def _forget(self) -> None:
        self.waiting.clear()
        self.sent.clear()
        self.bytes = 0

    @staticmethod
    def _fits(kind: str, tensor: Any) -> bool:
        torch = _torch()
        if not isinstance(tensor, torch.Tensor):
            return False
        if kind == "block":
            return bool(tensor.dtype == torch.float8_e4m3fn and tensor.dim() == 2)
        return bool(tensor.numel() == 1 and tensor.dtype.is_floating_point)

    def _as_decided(self, key: tuple[str, int], piece: tuple[str, str], copy: Any, value: float) -> Any:
        decided = self.decided.get(key)
        if decided is None:
            return copy
        g_stored, u_stored, shift, common = decided
        proj, kind = piece
        if kind == "global":
            same = value == (g_stored if proj == "gate_proj" else u_stored)
            return _torch().full_like(copy, common) if same else copy
        if proj == "gate_proj":
            return _tensor(_rescale(_codes(copy), 2.0**-shift)[0], copy) if shift else copy
        ratio = (common / u_stored) if self.reciprocal else (u_stored / common)  # up / c
        return _tensor(_rescale(_codes(copy), ratio)[0], copy)

    def _let_go(self, key: tuple[str, int]) -> list[tuple[str, Any]]:
        pieces = self.waiting.pop(key)
        sent = self.sent.pop(key, set())
        self.bytes -= sum(copy.nbytes for _, copy, _ in pieces.values())
        self.result.left += 1
        self.gone.add(key)
        return [(name, self._as_decided(key, p, copy, v)) for p, (name, copy, v) in pieces.items() if p not in sent]

    def _complete(self, key: tuple[str, int]) -> list[tuple[str, Any]]:
        """Fold an expert whose four pieces are in; forward all four."""
        pieces = self.waiting.pop(key)
        self.sent.pop(key, None)
        self.bytes -= sum(copy.nbytes for _, copy, _ in pieces.values())
        (gate_name, gate), (g_name, g_t), (up_name, up), (u_name, u_t) = (pieces[p][:2] for p in _ORDER)
        g, u = pieces["gate_proj", "global"][2], pieces["up_proj", "global"][2]
        raw = [(gate_name, gate), (g_name, g_t), (up_name, up), (u_name, u_t)]
        try:
            f = fold(gate, up, g, u, reciprocal=self.reciprocal)
        except Exception as exc:
            return self._fail(exc, raw)
        result = self.result
        result.experts += 1
        if f is None:
            self.decided.pop(key, None)
            return raw
        result.harmonized += 1
        result.worst_before = max(result.worst_before, f.before)
        result.worst_after = max(result.worst_after, f.after)
        self.decided[key] = (g, u, f.shift, f.common)
        torch = _torch()
        common_g, common_u = torch.full_like(g_t, f.common), torch.full_like(u_t, f.common)
        return [(gate_name, f.gate), (g_name, common_g), (up_name, f.up), (u_name, common_u)]

    def _fail(self, exc: Exception, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Turn off; everything waiting is forwarded as it is, so no expert is left half-folded."""
        self.error = f"{type(exc).__name__}: {exc}"
        rest = [
            (name, copy)
            for key, pieces in self.waiting.items()
            for piece, (name, copy, _) in pieces.items()
            if piece not in self.sent.get(key, set())
        ]
        self._forget()
        return out + rest
