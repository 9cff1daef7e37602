"""Give gate and up of each expert one global scale, folding the ratio into the fp8 block scales.

vLLM fuses gate_proj and up_proj into w13 and, after loading, dequantizes both halves with the gate's
global scale (ModelOpt ``weight_scale_2[:, 0]``; compressed-tensors ``weight_global_scale[:, 0]``, the
reciprocal).  ModelOpt's per-expert export often gives the two different scales, so up_proj would be
dequantized that far off.  The arithmetic is ``fp8.fold_many``; this module is the stream's side.

The fold acts on checkpoint tensors as they stream past, before vLLM copies them (vLLM's layerwise
reload processes a layer for its kernels inside ``load_weights``, so afterwards is too late).  It
depends on the four scale tensors alone, so any split of a checkpoint over ``load_weights`` calls gives
the same bytes: pieces still waiting when a call ends are forwarded as they are, and again, folded,
once their partners arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import fp8
from .fp8 import FP8_MAX, fold_many

__all__ = ["Folder", "Result"]

#: block scale bytes of complete experts folded as one batch at most: the table work is per batch, and a
#: batch this small stays in the CPU's caches and bounds the new tensors alive at once
BATCH = 4 << 20
#: the pieces of an expert the fold needs, by (projection, kind); NVFP4_AWQ adds down_proj's p (``rows``)
PIECES = (
    ("gate_proj", "block"),
    ("gate_proj", "global"),
    ("up_proj", "block"),
    ("up_proj", "global"),
    ("down_proj", "rows"),
)
_ROWS = 4
#: expert indices the Folder keeps state for; anything beyond passes as it is (verify reports it)
_MOST_EXPERTS = 1 << 16

Key = tuple[str, int]  # (MoE layer prefix, expert)
Out = list[tuple[str, Any]]  # (vLLM name, tensor) to forward, in order


@dataclass(slots=True)
class Result:
    """What the folds of one load did: experts seen and changed, the worst relative error before and after."""

    experts: int = 0  # experts whose four scale pieces met
    harmonized: int = 0  # of those, changed
    rows: int = 0  # of those, with down_proj's AWQ p folded into up's rows
    left: int = 0  # experts whose pieces never met (forwarded as they are)
    worst_before: float = 0.0  # of up_proj dequantized with gate's scale (vLLM without the fold)
    worst_after: float = 0.0  # of either half after the fold

    def __str__(self) -> str:
        left = f"; {self.left} left as they are (a partner never came)" if self.left else ""
        return (
            f"harmonized gate/up global scales of {self.harmonized} of {self.experts} experts: worst relative "
            f"error {100 * self.worst_before:.1f}% -> {100 * self.worst_after:.1f}% (fp8 rounding){left}"
        )


@dataclass(slots=True)
class Piece:
    """One scale tensor as read: block scales as a copy of their fp8 codes (some readers reuse their
    buffers), a global scale as its value, down's AWQ p as float32; ``like`` rebuilds the tensor."""

    name: str
    codes: Any  # uint8 numpy (block scales), float32 numpy (down's p: never forwarded) or None (a global scale)
    like: tuple[Any, Any, Any]
    value: float
    sent: bool = False  # forwarded, unfolded, at the end of an earlier call

    def tensor(self, new: Any = None) -> Any:
        """This piece as a tensor: as read, or with ``new`` codes (block scales) or value (a global scale)."""
        import torch

        dtype, shape, device = self.like
        if self.codes is None:
            return torch.full(shape, self.value if new is None else new, dtype=dtype, device=device)
        t = torch.from_numpy(self.codes if new is None else new).view(dtype)
        return t if device.type == "cpu" else t.to(device)


@dataclass(slots=True)
class Waiting:
    """An expert's pieces until all have passed (down's p too, for NVFP4_AWQ), in ``PIECES`` order."""

    pieces: list[Piece | None] = field(default_factory=lambda: [None] * 5)

    def complete(self, rows: bool) -> bool:
        return None not in self.pieces[: 5 if rows else 4]

    def bytes(self) -> int:
        return sum(p.codes.nbytes for p in self.pieces if p is not None and p.codes is not None)

    def unsent(self) -> dict[int, Piece]:
        """The scale pieces held and not yet forwarded, by their place in ``PIECES`` (down's p is folded
        or lost, never forwarded: vLLM has no parameter for it)."""
        return {i: p for i, p in enumerate(self.pieces[:_ROWS]) if p is not None and not p.sent}


@dataclass(slots=True, frozen=True)
class Decision:
    """What an expert's pieces in vLLM stand for since its last fold: gate's and up's global scale as
    stored, and the common scale both halves now carry."""

    gate: float
    up: float
    common: float


class Folder:
    """The stream's side of the fold, kept per model across ``load_weights`` calls.

    ``take`` receives each gate/up block or global scale of an expert and returns what to forward now.
    An expert's pieces wait until all four are in; one whose global scales agree then goes on at once,
    as read; the others wait until ``num_experts`` experts (a MoE layer in checkpoint order) have
    completed or ``BATCH`` bytes of their block scales wait, then fold as one batch.  ``flush`` (end of
    a call) folds what is complete and forwards the incomplete pieces as they are, keeping them for a
    later call.  An internal error turns the Folder off: everything waiting is forwarded whole, and
    every later piece passes as the checkpoint holds it.
    """

    def __init__(self, *, reciprocal: bool, num_experts: int | None, rows: bool = False) -> None:
        self.reciprocal = reciprocal
        self.rows = rows  # NVFP4_AWQ: an expert also waits for down's p, folded into up's rows
        self.num_experts = num_experts or 256
        self.waiting: dict[Key, Waiting] = {}
        self.ready: list[tuple[Key, Waiting]] = []  # complete, to fold in the next batch
        self.ready_bytes = 0
        self.completed = 0  # experts complete since the last batch folded (a layer's worth ends a batch)
        self.decided: dict[Key, Decision] = {}
        self.likes: dict[tuple[Any, Any, Any], tuple[Any, Any, Any]] = {}  # each (dtype, shape, device) once
        self.result = Result()
        self.error: str | None = None

    def reset(self) -> None:
        """A full load starts: nothing of an earlier checkpoint may pair with this one's."""
        self.waiting.clear()
        self.ready.clear()
        self.ready_bytes = self.completed = 0
        self.decided.clear()
        self.likes.clear()
        self.result = Result()

    def take(self, prefix: str, expert: int, proj: str, kind: str, name: str, tensor: Any, value: float | None) -> Out:
        """One gate/up scale piece in; what to forward now out (possibly nothing, possibly a batch)."""
        if kind == "rows" and not self.rows:
            return []
        if self.error is not None or not 0 <= expert < _MOST_EXPERTS or not _fits(kind, tensor):
            return [] if kind == "rows" else [(name, tensor)]
        key = (prefix, expert)
        try:
            if value is None:  # the stream reads global scales; block scales need no value
                value = float(tensor.reshape(-1)[0]) if kind == "global" else 0.0
            like = (tensor.dtype, tensor.shape, getattr(tensor, "device", None))
            codes = _copy(tensor) if kind == "block" else tensor if kind == "rows" else None
            piece = Piece(name, codes, self.likes.setdefault(like, like), value)
            held = self.waiting.setdefault(key, Waiting())
            held.pieces[PIECES.index((proj, kind))] = piece  # a second copy (a later update) replaces the first
        except Exception as exc:  # our bug: never break a load over the fold; the new piece goes last
            return [*self._fail(exc), (name, tensor)]
        out: Out = []
        try:
            if held.complete(self.rows):
                del self.waiting[key]
                self.completed += 1
                gate, up = held.pieces[1], held.pieces[3]
                if gate.value == up.value and not self.rows:  # type: ignore[union-attr]  # nothing to fold: on, as read
                    out += self._as_read([(key, held)])
                    self.result.experts += 1
                else:
                    self.ready.append((key, held))
                    self.ready_bytes += held.bytes()
                if self.completed >= self.num_experts or self.ready_bytes >= BATCH:
                    out += self._fold_ready()
        except Exception as exc:
            return [*out, *self._fail(exc)]
        return out

    def flush(self) -> Out:
        """End of a call: fold what is complete; forward every waiting piece not yet forwarded and keep it.

        A piece of an expert folded before (a later weight update) is forwarded as that fold had it, so
        the expert's block scales and global scale keep agreeing; any other as it is.
        """
        out = self._fold_ready()
        try:
            for key, held in self.waiting.items():
                unsent = held.unsent()
                out += self._as_decided(key, unsent)
                for p in unsent.values():
                    p.sent = True
        except Exception as exc:
            return [*out, *self._fail(exc)]
        return out

    def drop(self) -> Out:
        """End of a full load: like ``flush``, then forget what never met its partners."""
        out = self.flush()
        self.result.left += len(self.waiting)
        self.waiting.clear()
        return out

    # -- inside --------------------------------------------------------------------------------
    def _fold_ready(self) -> Out:
        """Fold the complete experts as one batch; forward all four pieces of each, or, on an error,
        every expert of the batch as read."""
        batch, self.ready, self.ready_bytes, self.completed = self.ready, [], 0, 0
        if not batch:
            return []
        try:
            inputs = [(h.pieces[0].codes, h.pieces[2].codes, h.pieces[1].value, h.pieces[3].value) for _, h in batch]  # type: ignore[union-attr]
            rows = [h.pieces[_ROWS].codes if h.pieces[_ROWS] is not None else None for _, h in batch]  # type: ignore[union-attr]
            folded = fold_many(inputs, reciprocal=self.reciprocal, rows=rows, rescale_rows=rescale_rows)
            out: Out = []
            for (key, held), f in zip(batch, folded, strict=True):
                if f is None:
                    out += self._as_read([(key, held)])
                else:
                    new = (f.gate, f.common, f.up, f.common)
                    out += [(p.name, p.tensor(v)) for p, v in zip(held.pieces[:_ROWS], new, strict=True)]  # type: ignore[union-attr]
        except Exception as exc:
            return [*self._as_read(batch), *self._fail(exc)]
        for (key, held), f in zip(batch, folded, strict=True):
            self.result.experts += 1
            if f is not None:
                self.result.rows += held.pieces[_ROWS] is not None
                self.result.harmonized += f.before > 0
                self.result.worst_before = max(self.result.worst_before, f.before)
                self.result.worst_after = max(self.result.worst_after, f.after)
                self.decided[key] = Decision(held.pieces[1].value, held.pieces[3].value, f.common)  # type: ignore[union-attr]
        return out

    def _as_read(self, batch: list[tuple[Key, Waiting]]) -> Out:
        """Complete experts, all four pieces as the checkpoint holds them; their last fold no longer holds."""
        out: Out = []
        for key, held in batch:
            self.decided.pop(key, None)
            out += [(p.name, p.tensor()) for p in held.pieces[:_ROWS] if p is not None]
        return out

    def _as_decided(self, key: Key, given: dict[int, Piece]) -> Out:
        """Pieces of one expert sent without all their partners, folded to the common scale of the expert's
        last fold, so what vLLM holds of it keeps agreeing: global scales become the common one and block
        scales come rescaled to it by their own global scale (a new one, if it came along).  A side whose
        block scales the common scale cannot hold, or whose global scale changed without its block
        scales, goes as it is; gate's ends the fold."""
        decided = self.decided.get(key)
        if decided is None:
            return [(p.name, p.tensor()) for p in given.values()]

        def ratio(stored: float) -> float:  # own scale / common
            return decided.common / stored if self.reciprocal else stored / decided.common

        def side(block: int, stored: float) -> float | None:
            """This side's factor for its block scales, or None if they cannot take the common scale."""
            value = given[block + 1].value if block + 1 in given else stored
            if block not in given:
                return ratio(stored) if value == stored else None
            return ratio(value) if fp8.fits(given[block].codes, ratio(value)) else None

        gate, up = side(0, decided.gate), side(2, decided.up)
        if gate is None:
            del self.decided[key]
            return [(p.name, p.tensor()) for p in given.values()]
        out: Out = []
        for slot, p in given.items():
            factor = gate if slot < 2 else up
            if factor is None or (p.codes is not None and factor == 1.0):
                out.append((p.name, p.tensor()))
            elif p.codes is None:  # a global scale
                out.append((p.name, p.tensor(decided.common)))
            else:
                out.append((p.name, p.tensor(fp8.rescale(p.codes, factor))))
        g = given[1].value if 1 in given else decided.gate
        u = given[3].value if up is not None and 3 in given else decided.up
        self.decided[key] = Decision(g, u, decided.common)  # what the expert's pieces in vLLM now stand for
        return out

    def _fail(self, exc: Exception) -> Out:
        """Turn off; forward everything waiting so no expert is left half-folded: complete experts as
        read (their last fold forgotten), the pieces of others as that fold had them if that still
        works, else as read."""
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
        out: Out = []
        for key, held in self.waiting.items():
            unsent = held.unsent()
            try:
                out += self._as_decided(key, unsent)
            except Exception:
                self.decided.pop(key, None)
                out += [(p.name, p.tensor()) for p in unsent.values()]
        out += self._as_read(self.ready)
        self.waiting.clear()
        self.ready.clear()
        self.ready_bytes = self.completed = 0
        return out


def rescale_rows(codes: Any, factors: Any) -> Any:
    """``fp8.rescale_rows`` through torch's fp8 cast (same bytes, tests/tensors/test_awq.py): in row
    chunks that stay in the CPU's caches, one float32 buffer reused."""
    import numpy as np
    import torch

    out = np.empty_like(codes)
    src = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn)
    dst = torch.from_numpy(out).view(torch.float8_e4m3fn)
    f = torch.from_numpy(np.asarray(factors, dtype=np.float32))[:, None]
    step = max(1, _ROWS_CHUNK // max(1, codes.shape[1]))
    buf = torch.empty((min(step, codes.shape[0]), codes.shape[1]), dtype=torch.float32)
    for i in range(0, codes.shape[0], step):
        b = buf[: min(step, codes.shape[0] - i)]
        b.copy_(src[i : i + step]).mul_(f[i : i + step]).clamp_(min=-FP8_MAX, max=FP8_MAX)
        dst[i : i + step].copy_(b)
    return out


#: block scales rounded per chunk in ``rescale_rows`` (128 KiB of codes: its float32 buffer stays in L2)
_ROWS_CHUNK = 1 << 17


def _copy(t: Any) -> Any:
    """fp8 block scales as a uint8 numpy copy of their codes."""
    import torch

    t = t.detach() if t.requires_grad else t
    return (t if t.is_cpu else t.cpu()).view(torch.uint8).numpy().copy()


def _fits(kind: str, tensor: Any) -> bool:
    """Whether the fold can hold this piece: fp8 e4m3 2-D block scales, or a one-element global scale of a
    float dtype that torch.full can make again."""
    import torch

    if kind == "rows":  # down's p, checked and made float32 numpy by the stream
        return True
    if kind == "block":
        return getattr(tensor, "dtype", None) is torch.float8_e4m3fn and tensor.dim() == 2
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return getattr(tensor, "dtype", None) in floats and tensor.numel() == 1
