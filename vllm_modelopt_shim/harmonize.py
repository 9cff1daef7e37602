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
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

__all__ = ["FP8_MAX", "Folder", "Result", "fold", "fold_many", "fold_tensors"]

FP8_MAX = 448.0
#: bytes of scale copies the Folder may hold at most, unless one MoE layer's gate/up block scales need more
BUDGET = 64 << 20
#: block scale bytes of waiting experts folded as one batch at most: the table work is per batch, but a batch
#: small enough to stay in the CPU's caches folds faster than a layer's worth of large experts
BATCH = 4 << 20


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
    """``table[codes]`` for a 256-entry uint8 table: bytes.translate, faster than numpy's gather.

    The result is copied out of the bytearray: an array over one holds a memoryview and its buffer, two
    objects Python's collector tracks, and a folded layer's worth of those alive at once, on top of
    vLLM's own allocations, made vLLM's process run a collection per MoE layer while loading (in
    time a full collection of its heap).
    """
    import numpy as np

    out = bytearray(np.ascontiguousarray(codes)).translate(table.tobytes())
    return np.frombuffer(out, dtype=np.uint8).reshape(codes.shape).copy()


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


def _shift(codes: Any, shift: int) -> Any:
    """Block scales divided by ``2**shift`` where ``_exact_shift`` holds: the exponent field lowered,
    zeros kept (what the rounding table gives them too, without its gather)."""
    import numpy as np

    return codes - (codes != 0).view(np.uint8) * np.uint8(shift << 3)


#: block scales per expert whose histogram weighs the reported error (evenly strided over larger ones)
SAMPLE = 1 << 12


def _counts(codes: Any) -> Any:
    """How often each fp8 code occurs: in all block scales, or in an even sample of ``SAMPLE`` or more.

    Only the reported rounding error is weighed with it; what the fold writes never depends on it.
    """
    import numpy as np

    flat = codes.reshape(-1)
    return np.bincount(flat[:: max(1, flat.size // SAMPLE)], minlength=256)


def _top(codes: Any) -> float:
    """The largest finite value among fp8 block scales (0 if none)."""
    import numpy as np

    if not codes.size:
        return 0.0
    values = _values()
    highest = int(codes.max())
    if highest < 0x7F:  # non-negative finite codes rise with their values
        return float(values[highest])
    present = np.bincount(codes.reshape(-1), minlength=256) > 0  # a NaN or a negative value: look at each
    finite = values[present & np.isfinite(values)]
    return max(float(finite.max()), 0.0) if finite.size else 0.0


def fold_many(experts: Sequence[tuple[Any, Any, float, float]], *, reciprocal: bool) -> list[Folded | None]:
    """Fold a batch of experts, each ``(gate codes, up codes, gate global, up global as stored)``.

    Block scales are fp8 codes (uint8 numpy arrays, gate's and up's of one shape); ``reciprocal``
    for compressed-tensors, whose global scale divides.  None for an expert with nothing to do:
    equal global scales, scales that are not one finite value > 0 (verify reports those), or block
    scales of two shapes.  Per expert one maximum, one (sampled) histogram and one gather; the rest
    once per batch.  The reported error is that of the block scales (each counted once, see ``_counts``).
    """
    import numpy as np

    out: list[Folded | None] = [None] * len(experts)
    todo = [
        i
        for i, (gate, up, g, u) in enumerate(experts)
        if g != u and gate.shape == up.shape and 0.0 < g < math.inf and 0.0 < u < math.inf  # NaN compares false
    ]
    if not todo:
        return out
    stored = np.array([experts[i][2] for i in todo], dtype=np.float64)
    g = 1.0 / stored if reciprocal else stored
    u = np.array([experts[i][3] for i in todo], dtype=np.float64)
    u = 1.0 / u if reciprocal else u
    count_up = np.stack([_counts(experts[i][1]) for i in todo])
    top = np.array([_top(experts[i][1]) for i in todo])  # up's largest finite block scale
    shift = np.zeros(len(todo), dtype=np.int64)
    while True:  # the smallest k >= 0 that keeps up's largest block scale within fp8
        over = u * top / (np.ldexp(g, shift)) > FP8_MAX
        if not over.any():
            break
        shift += over
    scale = np.ldexp(1.0, shift)
    common = stored / scale if reciprocal else stored * scale  # exact: a power of two
    moved = [j for j in range(len(todo)) if shift[j]]
    tables, products = _tables(np.concatenate([u / (g * scale), 1.0 / scale[moved]]))  # up's, then moved gates'
    up_table, gate_table = tables[: len(todo)], tables[len(todo) :]
    up_err = _errors(up_table, products[: len(todo)], count_up)
    gate_err = np.zeros(len(todo))
    gate_rows = dict(zip(moved, gate_table, strict=True))
    exact = {j for j in moved if _exact_shift(experts[todo[j]][0], int(shift[j]))}
    inexact = [k for k, j in enumerate(moved) if j not in exact]
    if inexact:  # the error of an exact shift is 0: only the others need their histogram
        counts = np.stack([_counts(experts[todo[moved[k]]][0]) for k in inexact])
        gate_exact = products[len(todo) :]
        gate_err[[moved[k] for k in inexact]] = _errors(gate_table[inexact], gate_exact[inexact], counts)
    before, after = (abs(g - u) / u).tolist(), np.maximum(gate_err, up_err).tolist()
    for j, (i, k, c) in enumerate(zip(todo, shift.tolist(), common.tolist(), strict=True)):
        gate, up = experts[i][0], experts[i][1]
        new_gate = (_shift(gate, k) if j in exact else _gather(gate_rows[j], gate)) if k else gate
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


_KINDS: list[tuple[Any, frozenset[Any]]] = []


def _kinds() -> tuple[Any, frozenset[Any]]:
    """The dtypes the fold takes: fp8 e4m3 block scales, floating-point global scales."""
    if not _KINDS:
        torch = _torch()
        _KINDS.append((torch.float8_e4m3fn, frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})))
    return _KINDS[0]


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


#: (projection, kind) -> the piece's slot in a waiting expert
_SLOTS = {("gate_proj", "block"): 0, ("gate_proj", "global"): 1, ("up_proj", "block"): 2, ("up_proj", "global"): 3}
#: A waiting expert is one flat list, one object for Python's collector however many pieces it holds (a
#: layer's worth of small objects per MoE layer made vLLM's process run a full collection during a load):
#: per slot its vLLM name (None: not held), data (block scales: a uint8 numpy copy of their codes; global
#: scales: None, their value will do), (dtype, shape, device) and value, then the bits of slots already
#: forwarded.
_NAME, _DATA, _META, _VALUE, _SENT = 0, 4, 8, 12, 16
#: expert indices the Folder keeps state for; anything beyond passes as it is (verify reports it)
_MOST_EXPERTS = 1 << 16

Held = list[Any]
Key = tuple[str, int]
Items = list[tuple[int, str, Any, float]]  # (slot, vLLM name, tensor, value) of pieces sent without a fold


def _nbytes(held: Held, slot: int) -> int:
    data = held[_DATA + slot]
    return 8 if data is None else int(data.nbytes)


def _copy(t: Any) -> Any:
    """fp8 block scales as a uint8 numpy copy of their codes."""
    t = t.detach() if t.requires_grad else t
    return (t if t.is_cpu else t.cpu()).view(_torch().uint8).numpy().copy()


def _piece(held: Held, slot: int, data: Any, value: float) -> Any:
    """A tensor like the piece held in ``slot``: block scales from fp8 codes, a global scale from its value."""
    dtype, shape, device = held[_META + slot]
    torch = _torch()
    if data is None:
        return torch.full(shape, value, dtype=dtype, device=device)
    t = torch.from_numpy(data).view(dtype)
    return t if device.type == "cpu" else t.to(device)


def _restore(held: Held, slot: int) -> Any:
    """A held piece as it was read (a global scale from its value: the same bits, but for a NaN's payload)."""
    return _piece(held, slot, held[_DATA + slot], held[_VALUE + slot])


class Folder:
    """The stream's side of the fold, kept per model across ``load_weights`` calls.

    ``take`` receives each gate/up block or global scale of an expert (vLLM name, tensor, value)
    and returns what to forward now.  An expert's pieces wait, as copies (some readers reuse their
    buffers), until all four are in.  A complete expert whose global scales agree goes on at once,
    as read; the others wait a little longer, until ``num_experts`` experts (one MoE layer, in
    checkpoint order) have completed or ``BATCH`` bytes of their block scales wait, and are folded
    together and forwarded expert by expert as vLLM takes them: the fold's table work costs per
    batch, and no layer's worth of new tensors is alive at once.  ``flush`` (end of a call) folds
    what is ready and forwards the incomplete pieces as they are, keeping them for a later call.
    At most ``limit`` bytes wait (``budget``, or one MoE layer's gate and up block scales if that is
    more); past that, ready experts are folded early and then the oldest incomplete expert is let go
    as it is.  An internal error turns the folder off: everything waiting, and every later piece,
    passes as the checkpoint holds it.
    """

    def __init__(self, *, reciprocal: bool, num_experts: int | None, budget: int = BUDGET) -> None:
        self.reciprocal = reciprocal
        self.num_experts = num_experts or 256
        self.budget = budget
        self.waiting: dict[Key, Held] = {}
        self.ready: list[tuple[Key, Held]] = []  # complete, to be folded in the next batch
        #: MoE layer -> per expert (gate, up global scale as stored, common scale as stored): what its pieces in
        #: vLLM stand for since its last fold (common NaN: no fold holds)
        self.decided: dict[str, list[float]] = {}
        self.gone: set[Key] = set()  # let go over the bound: their pieces pass as they are
        self.metas: dict[tuple[Any, Any, Any], tuple[Any, Any, Any]] = {}  # each (dtype, shape, device) kept once
        self.completed = 0  # experts complete since the last batch was folded
        self.batch_bytes = 0  # block scale bytes of the experts in ``ready``
        self.bytes = 0
        self.limit: int | None = None
        self.result = Result()
        self.error: str | None = None

    def reset(self) -> None:
        """A full load starts: nothing of an earlier checkpoint may pair with this one's."""
        self._forget()
        self.decided.clear()
        self.gone.clear()
        self.metas.clear()
        self.result = Result()

    def decision(self, prefix: str, expert: int) -> tuple[float, float, float] | None:
        """(gate, up global scale as stored, common scale as stored) of the expert's last fold that still holds."""
        row, at = self.decided.get(prefix), 3 * expert
        if row is None or at + 3 > len(row) or math.isnan(row[at + 2]):
            return None
        return row[at], row[at + 1], row[at + 2]

    def take(
        self, prefix: str, expert: int, proj: str, kind: str, name: str, tensor: Any, value: float | None
    ) -> Iterable[tuple[str, Any]]:
        key = (prefix, expert)
        if self.error is not None or not 0 <= expert < _MOST_EXPERTS or not self._fits(kind, tensor):
            return [(name, tensor)]
        try:
            if value is None:  # the stream reads global scales; block scales need no value
                value = float(tensor.reshape(-1)[0]) if kind == "global" else 0.0
            slot = _SLOTS[proj, kind]
            if key in self.gone:  # let go over the bound: its pieces pass at once, as its last fold had them
                return self._as_decided(key, [(slot, name, tensor, value)])
            data = _copy(tensor) if kind == "block" else None  # before anything changes: a global's value will do
            meta = (tensor.dtype, tensor.shape, tensor.device)
            meta = self.metas.setdefault(meta, meta)
            held = self.waiting.get(key)
            if held is None:
                held = self.waiting[key] = [None] * _SENT + [0]
            elif held[slot] is not None:  # a second copy (a later update): it replaces the first
                self.bytes -= _nbytes(held, slot)
                held[_SENT] &= ~(1 << slot)
            held[slot], held[_DATA + slot], held[_META + slot], held[_VALUE + slot] = name, data, meta, value
            self.bytes += _nbytes(held, slot)
            if self.limit is None and data is not None:
                self.limit = max(self.budget, 2 * self.num_experts * data.nbytes)
        except Exception as exc:  # our bug: never break a load over the fold; the new piece goes last
            return [*self._fail(exc, []), (name, tensor)]
        out: list[Iterable[tuple[str, Any]]] = []
        try:
            if None not in held[:_DATA]:
                del self.waiting[key]
                self.completed += 1
                if held[_VALUE + 1] == held[_VALUE + 3]:  # nothing to fold: on at once, as read
                    self.bytes -= sum(_nbytes(held, s) for s in range(_DATA))
                    out.append(self._emit([(key, held)], [None]))
                else:
                    self.ready.append((key, held))
                    self.batch_bytes += _nbytes(held, 0) + _nbytes(held, 2)
                if self.completed >= self.num_experts or self.batch_bytes >= BATCH:  # a layer, or enough
                    out.append(self._fold_ready())
            while self.error is None and self.limit is not None and self.bytes > self.limit:
                if self.ready:
                    out.append(self._fold_ready())
                elif len(self.waiting) > 1:
                    out.append(self._let_go(next(iter(self.waiting))))
                else:
                    break
        except Exception as exc:
            return self._fail(exc, chain.from_iterable(out))
        return chain.from_iterable(out) if out else []

    def flush(self) -> Iterable[tuple[str, Any]]:
        """End of a call: fold what is ready; forward every waiting piece not yet forwarded, and keep it waiting.

        A piece of an expert folded before (a later weight update) is forwarded as that fold had
        it, so the expert's block scales and global scale keep agreeing; any other as it is.
        """
        out = self._fold_ready()
        rest: list[tuple[str, Any]] = []
        try:
            for key, held in self.waiting.items():
                items = self._unsent(held)
                rest += self._as_decided(key, items)
                for slot, *_ in items:
                    held[_SENT] |= 1 << slot
        except Exception as exc:
            return self._fail(exc, chain(out, rest))
        return chain(out, rest)

    def drop(self) -> Iterable[tuple[str, Any]]:
        """End of a full load: like ``flush``, then forget what never met its partners."""
        out = self.flush()
        self.result.left += len(self.waiting)
        self._forget()
        return out

    # -- inside --------------------------------------------------------------------------------
    def _forget(self) -> None:
        self.waiting.clear()
        self.ready.clear()
        self.bytes = 0
        self.completed = 0
        self.batch_bytes = 0

    @staticmethod
    def _fits(kind: str, tensor: Any) -> bool:
        fp8, floats = _kinds()
        if kind == "block":
            return getattr(tensor, "dtype", None) is fp8 and tensor.dim() == 2
        return getattr(tensor, "dtype", None) in floats and tensor.numel() == 1

    def _decide(self, key: Key, gate: float, up: float, common: float) -> None:
        row = self.decided.get(key[0])
        if row is None:
            row = self.decided[key[0]] = []
        at = 3 * key[1]
        if len(row) < at + 3:
            row.extend([math.nan] * (at + 3 - len(row)))
        row[at], row[at + 1], row[at + 2] = gate, up, common

    def _undecide(self, key: Key) -> None:
        row, at = self.decided.get(key[0]), 3 * key[1]
        if row is not None and at + 3 <= len(row):
            row[at + 2] = math.nan

    @staticmethod
    def _unsent(held: Held) -> Items:
        """The held pieces not yet forwarded, as tensors again."""
        return [
            (s, held[s], _restore(held, s), held[_VALUE + s])
            for s in range(_DATA)
            if held[s] is not None and not held[_SENT] >> s & 1
        ]

    def _as_read(self, batch: list[tuple[Key, Held]]) -> list[tuple[str, Any]]:
        """Complete experts, all four pieces as the checkpoint holds them; their last fold no longer holds."""
        out: list[tuple[str, Any]] = []
        for key, held in batch:
            self._undecide(key)
            out += [(held[s], _restore(held, s)) for s in range(_DATA)]
        return out

    def _as_decided(self, key: Key, items: Items) -> list[tuple[str, Any]]:
        """Pieces of one expert sent without all their partners, folded to the common scale of the expert's
        last fold, so what vLLM holds of it keeps agreeing: global scales become the common one and block
        scales come rescaled to it, by their own global scale (a new one, if it came along).  A side whose
        block scales the common scale cannot hold, or whose global scale changed without its block
        scales, goes as it is; gate's ends the fold."""
        decided = self.decision(*key)
        if decided is None:
            return [(name, t) for _, name, t, _ in items]
        g_stored, u_stored, common = decided
        given = {slot: (t, value) for slot, _, t, value in items}

        def ratio(stored: float) -> float:  # own scale / common
            return (common / stored) if self.reciprocal else (stored / common)

        def side(block: int, stored: float) -> float | None:
            """The factor for this side's block scales, or None if it cannot be folded to the common scale."""
            value = given[block + 1][1] if block + 1 in given else stored
            if block not in given:
                return ratio(stored) if value == stored else None
            return ratio(value) if _fits_common(_codes(given[block][0]), ratio(value)) else None

        gate, up = side(0, g_stored), side(2, u_stored)
        if gate is None:
            self._undecide(key)
            return [(name, t) for _, name, t, _ in items]
        full_like = _torch().full_like
        out: list[tuple[str, Any]] = []
        for slot, name, t, _ in items:
            factor = gate if slot < 2 else up
            if factor is None:
                out.append((name, t))
            elif slot % 2:  # a global scale
                out.append((name, full_like(t, common)))
            elif factor == 1.0:
                out.append((name, t))
            else:
                out.append((name, _tensor(_rescale(_codes(t), factor), t)))
        g = given[1][1] if 1 in given else g_stored
        u = given[3][1] if up is not None and 3 in given else u_stored
        self._decide(key, g, u, common)  # what the expert's pieces in vLLM now stand for
        return out

    def _let_go(self, key: Key) -> list[tuple[str, Any]]:
        held = self.waiting.pop(key)
        self.bytes -= sum(_nbytes(held, s) for s in range(_DATA) if held[s] is not None)
        self.result.left += 1
        self.gone.add(key)
        return self._as_decided(key, self._unsent(held))

    def _fold_ready(self) -> Iterable[tuple[str, Any]]:
        """Fold the complete experts as one batch; forward all four pieces of each."""
        batch, self.ready = self.ready, []
        self.completed = self.batch_bytes = 0
        if not batch:
            return []
        for _, held in batch:
            self.bytes -= sum(_nbytes(held, s) for s in range(_DATA))
        try:
            inputs = [(h[_DATA], h[_DATA + 2], h[_VALUE + 1], h[_VALUE + 3]) for _, h in batch]
            folded = fold_many(inputs, reciprocal=self.reciprocal)
            for (gate, up, _, _), f in zip(inputs, folded, strict=True):
                if f is not None and (f.gate.shape != gate.shape or f.up.shape != up.shape):
                    raise ValueError(f"the fold changed block scales of shape {tuple(gate.shape)}")
        except Exception as exc:
            return self._fail(exc, self._as_read(batch))
        return self._emit(batch, folded)

    def _emit(self, batch: list[tuple[Key, Held]], folded: list[Folded | None]) -> Iterator[tuple[str, Any]]:
        """Forward a folded batch one expert at a time, recording each fold as its expert goes; an error
        forwards that expert and the rest of the batch as read."""
        result = self.result
        for j, ((key, held), f) in enumerate(zip(batch, folded, strict=True)):
            try:
                if f is None:
                    four = self._as_read([(key, held)])
                else:
                    four = [
                        (held[0], _piece(held, 0, f.gate, 0.0)),
                        (held[1], _piece(held, 1, None, f.common)),
                        (held[2], _piece(held, 2, f.up, 0.0)),
                        (held[3], _piece(held, 3, None, f.common)),
                    ]
            except Exception as exc:
                yield from self._fail(exc, self._as_read(batch[j:]))
                return
            result.experts += 1
            if f is not None:
                result.harmonized += 1
                result.worst_before = max(result.worst_before, f.before)
                result.worst_after = max(result.worst_after, f.after)
                self._decide(key, held[_VALUE + 1], held[_VALUE + 3], f.common)
            yield from four

    def _fail(self, exc: Exception, out: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Turn off; everything waiting is forwarded, so no expert is left half-folded: complete experts
        as they are (their last fold forgotten), the pieces of others as that fold had them if that
        still works, else as they are."""
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
        sent = list(out)  # what was on its way goes first
        rest: list[tuple[str, Any]] = []
        for key, held in self.waiting.items():
            items = self._unsent(held)
            try:
                rest += self._as_decided(key, items)
            except Exception:
                self._undecide(key)
                rest += [(name, t) for _, name, t, _ in items]
        rest += self._as_read(self.ready)
        self._forget()
        return sent + rest
