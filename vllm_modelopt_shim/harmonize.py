"""Give gate and up of each expert one global scale, folding the ratio into the fp8 block scales.

vLLM fuses gate_proj and up_proj into w13 and, after loading, dequantizes both halves with the
gate's global scale (ModelOpt ``weight_scale_2[:, 0]``; compressed-tensors
``weight_global_scale[:, 0]``, the reciprocal).  ModelOpt's per-expert export often gives the two
different scales, so up_proj would be dequantized that far off.

The fold acts on the checkpoint tensors as they stream past, before vLLM copies them (vLLM's
layerwise reload processes a layer for its kernels inside ``load_weights``, so afterwards is too
late).  ``Folder`` holds an expert's gate/up block and global scales (copies: some readers reuse
their buffers) until all four have passed and a layer's worth of experts is complete, then folds
them as one batch and emits them:

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
from collections.abc import Sequence
from typing import Any

__all__ = ["FP8_MAX", "Folder", "Result", "fold", "fold_many", "fold_tensors"]

FP8_MAX = 448.0
#: bytes of scale copies the Folder may hold at most, unless one MoE layer's gate/up block scales need more
BUDGET = 64 << 20


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
    """One expert's folded w13 scales: new block scales per half (codes from ``fold_many``, tensors from
    ``fold_tensors``) and the common global scale as stored."""

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


def _tables(ratios: Any) -> tuple[Any, Any]:
    """Per ratio (> 0), the 256-entry table fp8 code -> code of its value times the ratio (rounded, at
    most 448 in magnitude); and the exact products of codes 0..127.  One vectorized pass for a whole
    batch of experts (table work costs per call, not per byte), on the non-negative half: negating a
    value negates its rounding, so code | 0x80 maps to the table's code | 0x80."""
    import numpy as np

    exact = _values()[None, :128] * np.asarray(ratios, dtype=np.float64)[:, None]
    half = _encode(np.minimum(exact, FP8_MAX))
    half[:, 0x7F] = 0x7F  # NaN stays the NaN it was
    return np.concatenate([half, half | 0x80], axis=1), exact


def _errors(table: Any, exact: Any, counts: Any) -> Any:
    """Relative L2 error of each row's rounding, every code weighted by how often it occurs
    (``counts`` per code 0..255; a negative value's error is its magnitude's)."""
    import numpy as np

    values = _values()[:128]
    finite = np.isfinite(values)
    counts = counts[:, :128] + counts[:, 128:]
    diff = np.where(finite, values[table[:, :128]] - exact, 0.0)
    norm = (counts * np.where(finite, exact * exact, 0.0)).sum(axis=1)
    sq = (counts * diff * diff).sum(axis=1)
    return np.where(norm > 0, np.sqrt(sq / np.where(norm > 0, norm, 1.0)), 0.0)


def _gather(table: Any, codes: Any) -> Any:
    """``table[codes]`` for a 256-entry uint8 table: bytes.translate, twice as fast as numpy's gather."""
    import numpy as np

    out = bytearray(np.ascontiguousarray(codes)).translate(table.tobytes())
    return np.frombuffer(out, dtype=np.uint8).reshape(codes.shape)


def _rescale(codes: Any, ratio: float) -> Any:
    """fp8 codes (uint8 numpy) times ``ratio``, rounded to fp8 (at most 448)."""
    return _gather(_tables([ratio])[0][0], codes)


def _fits_common(codes: Any, ratio: float) -> bool:
    """Whether fp8 block scales times ``ratio`` stay finite and within fp8 (at most 448)."""
    top = float(_values()[int(codes.max())]) if codes.size else 0.0
    return math.isfinite(top) and top >= 0 and top * ratio <= FP8_MAX


def _exact_shift(codes: Any, shift: int) -> bool:
    """Whether dividing these block scales by ``2**shift`` is exact: every code zero or a normal number
    that stays normal (non-negative and no NaN, as block scales are)."""
    import numpy as np

    if not codes.size or int(codes.max()) >= 0x7F:
        return False
    lowest = int(np.subtract(codes, 1).min()) + 1  # uint8 wraps: zeros do not count
    return lowest == 256 or lowest >> 3 > shift


def fold_many(experts: Sequence[tuple[Any, Any, float, float]], *, reciprocal: bool) -> list[Folded | None]:
    """Fold a batch of experts, each ``(gate codes, up codes, gate global, up global as stored)``.

    Block scales are fp8 codes (uint8 numpy arrays, gate's and up's of one shape); ``reciprocal``
    for compressed-tensors, whose global scale divides.  None for an expert with nothing to do:
    equal global scales, scales that are not one finite value > 0 (verify reports those), or block
    scales of two shapes.  Per expert one histogram and one gather; the rest once per batch.  The
    reported error is that of the block scales (each counted once).
    """
    import numpy as np

    out: list[Folded | None] = [None] * len(experts)
    todo = [
        i
        for i, (gate, up, g, u) in enumerate(experts)
        if g != u and gate.shape == up.shape and all(math.isfinite(x) and x > 0 for x in (g, u))
    ]
    if not todo:
        return out
    values = _values()
    stored = np.array([experts[i][2] for i in todo], dtype=np.float64)
    g = 1.0 / stored if reciprocal else stored
    u = np.array([experts[i][3] for i in todo], dtype=np.float64)
    u = 1.0 / u if reciprocal else u
    count_up = np.stack([np.bincount(experts[i][1].reshape(-1), minlength=256) for i in todo])
    present = np.where((count_up > 0) & np.isfinite(values), values, -np.inf).max(axis=1)
    top = np.where(np.isfinite(present), present, 0.0)  # up's largest finite block scale
    shift = np.zeros(len(todo), dtype=np.int64)
    while True:  # the smallest k >= 0 that keeps up's largest block scale within fp8
        over = u * top / (np.ldexp(g, shift)) > FP8_MAX
        if not over.any():
            break
        shift += over
    scale = np.ldexp(1.0, shift)
    common = stored / scale if reciprocal else stored * scale  # exact: a power of two
    up_table, up_exact = _tables(u / (g * scale))
    up_err = _errors(up_table, up_exact, count_up)
    moved = [j for j in range(len(todo)) if shift[j]]
    gate_err = np.zeros(len(todo))
    gate_rows = {}
    if moved:
        gate_table, gate_exact = _tables(1.0 / scale[moved])
        gate_rows = dict(zip(moved, gate_table, strict=True))
        inexact = [k for k, j in enumerate(moved) if not _exact_shift(experts[todo[j]][0], int(shift[j]))]
        if inexact:  # the error of an exact shift is 0: only the others need their histogram
            counts = np.stack([np.bincount(experts[todo[moved[k]]][0].reshape(-1), minlength=256) for k in inexact])
            gate_err[[moved[k] for k in inexact]] = _errors(gate_table[inexact], gate_exact[inexact], counts)
    before, after = (abs(g - u) / u).tolist(), np.maximum(gate_err, up_err).tolist()
    for j, (i, k, c) in enumerate(zip(todo, shift.tolist(), common.tolist(), strict=True)):
        gate, up = experts[i][0], experts[i][1]
        new_gate = _gather(gate_rows[j], gate) if k else gate
        out[i] = Folded(new_gate, _gather(up_table[j], up), c, k, before[j], after[j])
    return out


def _codes(t: Any) -> Any:
    """fp8 tensor -> its codes as uint8 numpy, shared memory where it is on the CPU (strides kept)."""
    t = t.detach() if t.requires_grad else t
    return (t if t.device.type == "cpu" else t.cpu()).view(_torch().uint8).numpy()


def _tensor(codes: Any, like: Any) -> Any:
    """uint8 numpy codes of ``like``'s shape -> an fp8 tensor on ``like``'s device."""
    torch = _torch()
    out = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    return out if like.device.type == "cpu" else out.to(like.device)


def _torch() -> Any:
    import torch

    return torch


def fold_tensors(experts: Sequence[tuple[Any, Any, float, float]], *, reciprocal: bool) -> list[Folded | None]:
    """``fold_many`` on torch fp8 block scales [I, K/16]: the new block scales come back as tensors."""
    folded = fold_many([(_codes(gate), _codes(up), g, u) for gate, up, g, u in experts], reciprocal=reciprocal)
    for (gate, up, _, _), f in zip(experts, folded, strict=True):
        if f is not None:
            f.gate = gate if f.shift == 0 else _tensor(f.gate, gate)
            f.up = _tensor(f.up, up)
    return folded


def fold(gate: Any, up: Any, g_stored: float, u_stored: float, *, reciprocal: bool) -> Folded | None:
    """``fold_tensors`` for one expert."""
    return fold_tensors([(gate, up, g_stored, u_stored)], reciprocal=reciprocal)[0]


Pieces = dict[tuple[str, str], tuple[str, Any, float]]  # (proj, kind) -> (vLLM name, copy, value)
_ORDER = (("gate_proj", "block"), ("gate_proj", "global"), ("up_proj", "block"), ("up_proj", "global"))


def _inputs(pieces: Pieces) -> tuple[Any, Any, float, float]:
    """An expert's four pieces as the fold takes them: gate and up block scales, their global scales."""
    (_, gate, _), (_, _, g), (_, up, _), (_, _, u) = (pieces[p] for p in _ORDER)
    return gate, up, g, u


class Folder:
    """The stream's side of the fold, kept per model across ``load_weights`` calls.

    ``take`` receives each gate/up block or global scale of an expert (vLLM name, tensor, value)
    and returns what to forward now.  An expert's pieces wait, as copies (some readers reuse their
    buffers), until all four are in; complete experts wait a little longer, until a batch of
    ``num_experts`` (one MoE layer, in checkpoint order) is ready, and are folded together and
    forwarded: the fold's table work costs per batch, not per expert.  ``flush`` (end of a call)
    folds what is ready and forwards the incomplete pieces as they are, keeping them for a later
    call.  At most ``limit`` bytes wait (``budget``, or one MoE layer's gate and up block scales if
    that is more); past that, ready experts are folded early and then the oldest incomplete expert
    is let go as it is.  An internal error turns the folder off: everything waiting, and every
    later piece, passes as the checkpoint holds it.
    """

    def __init__(self, *, reciprocal: bool, num_experts: int | None, budget: int = BUDGET) -> None:
        self.reciprocal = reciprocal
        self.num_experts = num_experts or 256
        self.budget = budget
        self.waiting: dict[tuple[str, int], Pieces] = {}
        self.sent: dict[tuple[str, int], set[tuple[str, str]]] = {}  # pieces of waiting experts already forwarded
        self.ready: list[tuple[tuple[str, int], Pieces]] = []  # complete, to be folded in the next batch
        #: expert -> (gate, up global scale as stored, common scale as stored) its pieces in vLLM stand for
        self.decided: dict[tuple[str, int], tuple[float, float, float]] = {}
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
        if self.error is not None or not self._fits(kind, tensor):
            return [(name, tensor)]
        try:
            if value is None:  # the stream reads global scales; block scales need no value
                value = float(tensor.reshape(-1)[0]) if kind == "global" else 0.0
            piece = (proj, kind)
            if key in self.gone:  # let go over the bound: its pieces pass at once, as its last fold had them
                return self._as_decided(key, [(piece, name, tensor, value)])
            copy = (tensor.detach() if tensor.requires_grad else tensor).clone()  # before anything changes
            pieces = self.waiting.get(key)
            if pieces is None:
                pieces = self.waiting[key] = {}
            elif piece in pieces:  # a second copy (a later update): it replaces the first
                self.bytes -= pieces[piece][1].nbytes
                self.sent.get(key, set()).discard(piece)
            pieces[piece] = (name, copy, value)
            self.bytes += copy.nbytes
            if self.limit is None and kind == "block":
                self.limit = max(self.budget, 2 * self.num_experts * copy.nbytes)
        except Exception as exc:  # our bug: never break a load over the fold; the new piece goes last
            return [*self._fail(exc, []), (name, tensor)]
        out: list[tuple[str, Any]] = []
        try:
            if len(pieces) == len(_ORDER):
                del self.waiting[key]
                self.sent.pop(key, None)
                self.ready.append((key, pieces))
                if len(self.ready) >= self.num_experts:
                    out = self._fold_ready()
            while self.error is None and self.limit is not None and self.bytes > self.limit:
                if self.ready:
                    out.extend(self._fold_ready())
                elif len(self.waiting) > 1:
                    out.extend(self._let_go(next(iter(self.waiting))))
                else:
                    break
        except Exception as exc:
            return self._fail(exc, out)
        return out

    def flush(self) -> list[tuple[str, Any]]:
        """End of a call: fold what is ready; forward every waiting piece not yet forwarded, and keep it waiting.

        A piece of an expert folded before (a later weight update) is forwarded as that fold had
        it, so the expert's block scales and global scale keep agreeing; any other as it is.
        """
        out = self._fold_ready()
        try:
            for key, pieces in self.waiting.items():
                sent = self.sent.setdefault(key, set())
                items = [
                    (piece, name, copy, value) for piece, (name, copy, value) in pieces.items() if piece not in sent
                ]
                out += self._as_decided(key, items)
                sent.update(piece for piece, *_ in items)
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
        self.ready.clear()
        self.bytes = 0

    @staticmethod
    def _fits(kind: str, tensor: Any) -> bool:
        torch = _torch()
        if not isinstance(tensor, torch.Tensor):
            return False
        if kind == "block":
            return bool(tensor.dtype == torch.float8_e4m3fn and tensor.dim() == 2)
        return bool(tensor.numel() == 1 and tensor.dtype.is_floating_point)

    def _as_decided(
        self, key: tuple[str, int], items: list[tuple[tuple[str, str], str, Any, float]]
    ) -> list[tuple[str, Any]]:
        """Pieces of one expert sent without all their partners (``(piece, name, tensor, value)``), folded
        to the common scale of the expert's last fold, so what vLLM holds of it keeps agreeing: global
        scales become the common one and block scales come rescaled to it, by their own global scale
        (a new one, if it came along).  A side whose block scales the common scale cannot hold, or
        whose global scale changed without its block scales, goes as it is; gate's ends the fold."""
        decided = self.decided.get(key)
        if decided is None:
            return [(name, t) for _, name, t, _ in items]
        g_stored, u_stored, common = decided
        given = {piece: (t, value) for piece, _, t, value in items}

        def ratio(stored: float) -> float:  # own scale / common
            return (common / stored) if self.reciprocal else (stored / common)

        def side(block: tuple[str, str], scale: tuple[str, str], stored: float) -> float | None:
            """The factor for this side's block scales, or None if it cannot be folded to the common scale."""
            value = given[scale][1] if scale in given else stored
            if block not in given:
                return ratio(stored) if value == stored else None
            return ratio(value) if _fits_common(_codes(given[block][0]), ratio(value)) else None

        gate, up = side(_ORDER[0], _ORDER[1], g_stored), side(_ORDER[2], _ORDER[3], u_stored)
        if gate is None:
            del self.decided[key]
            return [(name, t) for _, name, t, _ in items]
        full_like = _torch().full_like
        out: list[tuple[str, Any]] = []
        for piece, name, t, _ in items:
            factor = gate if piece[0] == "gate_proj" else up
            if factor is None:
                out.append((name, t))
            elif piece[1] == "global":
                out.append((name, full_like(t, common)))
            elif factor == 1.0:
                out.append((name, t))
            else:
                out.append((name, _tensor(_rescale(_codes(t), factor), t)))
        g = given[_ORDER[1]][1] if _ORDER[1] in given else g_stored
        u = given[_ORDER[3]][1] if up is not None and _ORDER[3] in given else u_stored
        self.decided[key] = (g, u, common)  # what the expert's pieces in vLLM now stand for
        return out

    def _let_go(self, key: tuple[str, int]) -> list[tuple[str, Any]]:
        pieces = self.waiting.pop(key)
        sent = self.sent.pop(key, set())
        self.bytes -= sum(copy.nbytes for _, copy, _ in pieces.values())
        self.result.left += 1
        self.gone.add(key)
        return self._as_decided(key, [(p, name, copy, v) for p, (name, copy, v) in pieces.items() if p not in sent])

    def _fold_ready(self) -> list[tuple[str, Any]]:
        """Fold the complete experts as one batch; forward all four pieces of each."""
        batch, self.ready = self.ready, []
        raw = [[pieces[p][:2] for p in _ORDER] for _, pieces in batch]
        for _, pieces in batch:
            self.bytes -= sum(copy.nbytes for _, copy, _ in pieces.values())
        if not batch:
            return []
        try:
            folded = fold_tensors([_inputs(pieces) for _, pieces in batch], reciprocal=self.reciprocal)
            full_like = _torch().full_like
            out: list[tuple[str, Any]] = []
            decided: list[tuple[tuple[str, int], Pieces, Folded]] = []
            for (key, pieces), f, four in zip(batch, folded, raw, strict=True):
                if f is None:
                    out += four
                    continue
                decided.append((key, pieces, f))
                (gate_name, _), (g_name, g_t), (up_name, _), (u_name, u_t) = four
                out += [
                    (gate_name, f.gate),
                    (g_name, full_like(g_t, f.common)),
                    (up_name, f.up),
                    (u_name, full_like(u_t, f.common)),
                ]
        except Exception as exc:
            for key, _ in batch:
                self.decided.pop(key, None)
            return self._fail(exc, [piece for four in raw for piece in four])
        # only now, with every expert's pieces in hand: an error above leaves the batch as it was read
        result = self.result
        result.experts += len(batch)
        result.harmonized += len(decided)
        for key, _ in batch:
            self.decided.pop(key, None)
        for key, pieces, f in decided:
            result.worst_before = max(result.worst_before, f.before)
            result.worst_after = max(result.worst_after, f.after)
            self.decided[key] = (pieces[_ORDER[1]][2], pieces[_ORDER[3]][2], f.common)
        return out

    def _fail(self, exc: Exception, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Turn off; everything waiting is forwarded, so no expert is left half-folded: complete experts
        as they are (their last fold forgotten), the pieces of others as that fold had them if that
        still works, else as they are."""
        self.error = f"{type(exc).__name__}: {exc}"
        rest: list[tuple[str, Any]] = []
        for key, pieces in self.waiting.items():
            sent = self.sent.get(key, set())
            items = [(piece, name, copy, v) for piece, (name, copy, v) in pieces.items() if piece not in sent]
            try:
                rest += self._as_decided(key, items)
            except Exception:
                self.decided.pop(key, None)
                rest += [(name, copy) for _, name, copy, _ in items]
        for key, pieces in self.ready:
            self.decided.pop(key, None)
            rest += [pieces[p][:2] for p in _ORDER]
        self._forget()
        return out + rest
