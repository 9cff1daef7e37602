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

import torch

__all__ = ["FP8_MAX", "Folder", "Result", "fold", "fold_many"]

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
    """One expert's folded w13 scales: new block scales per half and the common global scale as stored."""

    __slots__ = ("after", "before", "common", "gate", "shift", "up")

    def __init__(
        self, gate: torch.Tensor, up: torch.Tensor, common: float, shift: int, before: float, after: float
    ) -> None:
        self.gate, self.up, self.common, self.shift = gate, up, common, shift
        self.before, self.after = before, after


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(max=FP8_MAX).to(torch.float8_e4m3fn)


_LUT: list[torch.Tensor] = []
#: experts per batched step: bounds the int32 temporaries to ~CHUNK x one expert's block scales x 4
CHUNK = 32


def _values() -> torch.Tensor:
    """fp8 e4m3 code (0..255) -> its value, float64 (NaN for the two NaN codes)."""
    if not _LUT:
        _LUT.append(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double())
    return _LUT[0]


def _rescale(scales: torch.Tensor, ratios: list[float]) -> tuple[torch.Tensor, list[float]]:
    """fp8 ``scales`` [n, ...] times ``ratios`` [n], rounded to fp8; and each one's relative L2 error.

    An fp8 tensor holds one of 256 values per byte, so everything goes through 256-entry tables:
    one histogram and one gather over the bytes per batch (casting fp8 element by element costs
    ten times more on CPU, and per-expert torch calls would dominate a 6,144-expert load).
    """
    n = scales.shape[0]
    values = _values()
    exact = values[None, :] * torch.tensor(ratios, dtype=torch.float64)[:, None]  # [n, 256]
    table = _to_fp8(exact.clone())  # code -> new code, per expert
    finite = torch.isfinite(values)[None, :]
    diff = torch.where(finite, table.double() - exact, 0.0)
    codes = scales.view(torch.uint8).reshape(n, -1).int() + (torch.arange(n, dtype=torch.int32) * 256)[:, None]
    counts = torch.bincount(codes.reshape(-1), minlength=n * 256).view(n, 256).double()
    norms = (counts * torch.where(finite, exact * exact, 0.0)).sum(1)
    errs = ((counts * diff * diff).sum(1) / norms.clamp(min=1e-300)).sqrt().where(norms > 0, 0.0)
    out = torch.index_select(table.view(torch.uint8).reshape(-1), 0, codes.reshape(-1))
    return out.view(torch.float8_e4m3fn).reshape(scales.shape), errs.tolist()


def _largest(scales: torch.Tensor) -> list[float]:
    """The largest finite value of each fp8 tensor in ``scales`` [n, ...] (block scales are >= 0)."""
    codes = scales.view(torch.uint8).reshape(scales.shape[0], -1)
    tops = codes.amax(1).tolist()
    values = _values()
    out = []
    for i, top in enumerate(tops):
        if top < 0x7F:  # non-negative codes are ordered as their values
            out.append(float(values[top]))
        else:
            present = values[torch.bincount(codes[i], minlength=256) > 0]
            present = present[torch.isfinite(present)]
            out.append(float(present.max()) if present.numel() else 0.0)
    return out


def fold(gate: torch.Tensor, up: torch.Tensor, g_stored: float, u_stored: float, *, reciprocal: bool) -> Folded | None:
    """Fold one expert: ``gate``/``up`` fp8 block scales [I, K/16], their global scales as stored."""
    return fold_many([gate], [up], [g_stored], [u_stored], reciprocal=reciprocal)[0]


def fold_many(
    gates: list[torch.Tensor], ups: list[torch.Tensor], g: list[float], u: list[float], *, reciprocal: bool
) -> list[Folded | None]:
    """Fold experts of one layer together: block scales of one shape, global scales as stored.

    ``reciprocal`` for compressed-tensors, whose global scale divides.  None for an expert with
    nothing to do: equal global scales, or scales that are not one finite value > 0 (verify
    reports those).  The reported error is that of the block scales (each block counted once).
    """
    out: list[Folded | None] = [None] * len(gates)
    groups: dict[tuple[int, ...], list[int]] = {}  # one stack per shape (layers may differ)
    for i in range(len(gates)):
        if g[i] != u[i] and all(math.isfinite(x) and x > 0 for x in (g[i], u[i])) and gates[i].shape == ups[i].shape:
            groups.setdefault(tuple(gates[i].shape), []).append(i)
    for todo in groups.values():
        _fold_group(todo, gates, ups, g, u, reciprocal, out)
    return out


def _fold_group(
    todo: list[int],
    gates: list[torch.Tensor],
    ups: list[torch.Tensor],
    g: list[float],
    u: list[float],
    reciprocal: bool,
    out: list[Folded | None],
) -> None:
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        up = torch.stack([ups[i] for i in chunk])
        gv = [1.0 / g[i] if reciprocal else g[i] for i in chunk]  # what multiplies the e2m1 values
        uv = [1.0 / u[i] if reciprocal else u[i] for i in chunk]
        shifts = []
        for k, top in enumerate(_largest(up)):
            shift = 0
            while uv[k] * top / (gv[k] * 2.0**shift) > FP8_MAX:
                shift += 1
            shifts.append(shift)
        new_up, err_up = _rescale(up, [uv[k] / (gv[k] * 2.0**s) for k, s in enumerate(shifts)])
        shifted = [k for k, s in enumerate(shifts) if s]
        new_gates: dict[int, torch.Tensor] = {}
        err_gate = dict.fromkeys(range(len(chunk)), 0.0)
        if shifted:
            moved, errs = _rescale(
                torch.stack([gates[chunk[k]] for k in shifted]), [2.0 ** -shifts[k] for k in shifted]
            )
            for j, k in enumerate(shifted):
                new_gates[k], err_gate[k] = moved[j], errs[j]
        for k, i in enumerate(chunk):
            stored = g[i] / 2.0 ** shifts[k] if reciprocal else g[i] * 2.0 ** shifts[k]  # exact: a power of two
            before = abs(gv[k] - uv[k]) / uv[k]
            gate = new_gates.get(k, gates[i])
            out[i] = Folded(gate, new_up[k], stored, shifts[k], before, max(err_gate[k], err_up[k]))


Pieces = dict[tuple[str, str], tuple[str, torch.Tensor, float]]  # (proj, kind) -> (vLLM name, copy, value)


class Folder:
    """The stream's side of the fold, kept per model across ``load_weights`` calls.

    ``take`` receives each gate/up block or global scale of an expert (vLLM name, tensor, value)
    and returns what to forward now.  Pieces wait (as copies) until their expert's four are in;
    complete experts are folded together, ``CHUNK`` at a time (and whatever is left when the call
    ends), so per-expert torch calls never dominate and the order of layers does not matter.
    ``flush`` (end of a call) also forwards the pieces of incomplete experts, as they are, and
    keeps them waiting for a later call.  At most
    ``limit`` bytes wait (one MoE layer's gate and up block scales, from the first one seen);
    past that the oldest incomplete expert is let go as it is.  An internal error turns the
    folder off: everything waiting, and every later piece, passes as the checkpoint holds it.
    """

    def __init__(self, *, reciprocal: bool, num_experts: int | None) -> None:
        self.reciprocal = reciprocal
        self.num_experts = num_experts or 256
        self.waiting: dict[tuple[str, int], Pieces] = {}
        self.sent: dict[tuple[str, int], set[tuple[str, str]]] = {}  # pieces of waiting experts already forwarded
        self.ready: list[tuple[tuple[str, int], Pieces]] = []  # complete, not yet folded (< CHUNK)
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
            out: list[tuple[str, Any]] = []
            if value is None:
                value = float(tensor.reshape(-1)[0])
            pieces = self.waiting.setdefault(key, {})
            old = pieces.get((proj, kind))
            if old is not None:  # a second copy (a later update): it replaces the first
                self.bytes -= old[1].nbytes
            copy = tensor.detach().clone()  # the reader may reuse its buffer once we hand it back
            pieces[(proj, kind)] = (name, copy, value)
            self.sent.setdefault(key, set()).discard((proj, kind))
            self.bytes += copy.nbytes
            if self.limit is None and kind == "block":
                self.limit = 2 * self.num_experts * copy.nbytes
            if len(pieces) == len(_PIECES):
                self.ready.append((key, self.waiting.pop(key)))
                self.sent.pop(key, None)
                if len(self.ready) >= CHUNK:
                    out.extend(self._fold_ready())
            if self.limit is not None and self.bytes > self.limit:
                out.extend(self._fold_ready())
                while self.bytes > self.limit and len(self.waiting) > 1:
                    out.extend(self._let_go(next(iter(self.waiting))))
            return out
        except Exception as exc:  # our bug: never break a load over the fold
            return self._fail(exc, [(name, tensor)])

    def flush(self) -> list[tuple[str, Any]]:
        """End of a call: fold what is complete; forward every other waiting piece and keep it waiting.

        A waiting piece of an expert folded before (a later weight update) is forwarded as that
        fold had it, so the expert's block scales and global scale keep agreeing; any other as
        it is.
        """
        out = self._fold_ready()
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
        self.ready.clear()
        self.bytes = 0

    @staticmethod
    def _fits(kind: str, tensor: Any) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        if kind == "block":
            return bool(tensor.dtype == torch.float8_e4m3fn and tensor.dim() == 2)
        return bool(tensor.numel() == 1 and tensor.dtype.is_floating_point)

    def _as_decided(self, key: tuple[str, int], piece: tuple[str, str], copy: torch.Tensor, value: float) -> Any:
        decided = self.decided.get(key)
        if decided is None:
            return copy
        g_stored, u_stored, shift, common = decided
        proj, kind = piece
        if kind == "global":
            return torch.full_like(copy, common) if value == (g_stored if proj == "gate_proj" else u_stored) else copy
        if proj == "gate_proj":
            return _rescale(copy[None], [2.0**-shift])[0][0] if shift else copy
        ratio = (common / u_stored) if self.reciprocal else (u_stored / common)  # up / c
        return _rescale(copy[None], [ratio])[0][0]

    def _let_go(self, key: tuple[str, int]) -> list[tuple[str, Any]]:
        pieces = self.waiting.pop(key)
        sent = self.sent.pop(key, set())
        self.bytes -= sum(copy.nbytes for _, copy, _ in pieces.values())
        self.result.left += 1
        self.gone.add(key)
        return [(name, self._as_decided(key, p, copy, v)) for p, (name, copy, v) in pieces.items() if p not in sent]

    def _fold_ready(self) -> list[tuple[str, Any]]:
        """Fold every complete expert in one batch; forward all four pieces of each."""
        ready, self.ready = self.ready, []
        if not ready:
            return []
        self.bytes -= sum(copy.nbytes for _, pieces in ready for _, copy, _ in pieces.values())
        order = (("gate_proj", "block"), ("gate_proj", "global"), ("up_proj", "block"), ("up_proj", "global"))
        raw = [[pieces[p][:2] for p in order] for _, pieces in ready]
        try:
            with torch.no_grad():
                folded = fold_many(
                    [pieces["gate_proj", "block"][1] for _, pieces in ready],
                    [pieces["up_proj", "block"][1] for _, pieces in ready],
                    [pieces["gate_proj", "global"][2] for _, pieces in ready],
                    [pieces["up_proj", "global"][2] for _, pieces in ready],
                    reciprocal=self.reciprocal,
                )
        except Exception as exc:
            return self._fail(exc, [x for four in raw for x in four])
        out: list[tuple[str, Any]] = []
        result = self.result
        for (key, pieces), four, f in zip(ready, raw, folded, strict=True):
            result.experts += 1
            if f is None:
                self.decided.pop(key, None)
                out.extend(four)
                continue
            result.harmonized += 1
            result.worst_before = max(result.worst_before, f.before)
            result.worst_after = max(result.worst_after, f.after)
            self.decided[key] = (pieces["gate_proj", "global"][2], pieces["up_proj", "global"][2], f.shift, f.common)
            (gate_name, _), (g_name, g_t), (up_name, _), (u_name, u_t) = four
            out += [(gate_name, f.gate), (g_name, torch.full_like(g_t, f.common))]
            out += [(up_name, f.up), (u_name, torch.full_like(u_t, f.common))]
        return out

    def _fail(self, exc: Exception, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Turn off; everything waiting is forwarded as it is, so no expert is left half-folded."""
        self.error = f"{type(exc).__name__}: {exc}"
        rest = [x for _, pieces in self.ready for x in (v[:2] for v in pieces.values())]
        rest += [
            (name, copy)
            for key, pieces in self.waiting.items()
            for piece, (name, copy, _) in pieces.items()
            if piece not in self.sent.get(key, set())
        ]
        self._forget()
        return out + rest
