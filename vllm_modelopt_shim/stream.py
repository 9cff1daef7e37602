"""The weight stream rewrite: one lazy pass, names changed, tensors forwarded by identity.

Generic over the tensor type so it needs no torch: the runtime passes torch tensors and
``Tensor.item`` as ``scalar``; the doctor passes safetensors header entries.
"""

from __future__ import annotations

import math
from time import perf_counter

from . import verify
from .errors import CheckpointError
from .ledger import Ledger
from .names import AWQ_SUFFIX, COMPRESSED, FUSED, MODELOPT, SCALAR_SUFFIXES, parse, rename

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable
    from typing import Any, Protocol, TypeVar

    T = TypeVar("T")

    class Fold(Protocol):
        """What ``harmonize.Folder`` offers the stream (see there)."""

        def take(
            self, prefix: str, expert: int, proj: str, kind: str, name: str, tensor: Any, value: float | None
        ) -> list[tuple[str, Any]]: ...

        def flush(self) -> list[tuple[str, Any]]: ...

        def drop(self) -> list[tuple[str, Any]]: ...

    class Awq(Protocol):
        """What ``awqfold.AwqFolder`` offers the stream (see there)."""

        def p(self, name: str, proj: str, tensor: Any) -> Any: ...

        def expert_p(self, prefix: str, expert: int, proj: str, name: str, p: Any) -> list[tuple[str, Any]]: ...

        def o_p(self, name: str, p: Any) -> list[tuple[str, Any]]: ...

        def take(self, name: str, tensor: Any) -> list[tuple[str, Any]] | None: ...

        def drop(self) -> list[tuple[str, Any]]: ...


__all__ = ["PIECES", "rewrite"]

#: family -> canonical suffix -> the fold's kind of piece (gate/up only; down_proj has no partner)
PIECES = {
    MODELOPT: {"weight_scale": "block", "weight_scale_2": "global"},
    COMPRESSED: {"weight_scale": "block", "weight_global_scale": "global"},
}
_FOLDED = frozenset({"gate_proj", "up_proj"})
_O_P = ".self_attn.o_proj." + AWQ_SUFFIX


def _raise(problem: CheckpointError) -> None:
    raise problem


def _refused(problem: CheckpointError, ledger: Ledger, on_problem: Callable[[CheckpointError], None]) -> None:
    try:
        on_problem(problem)
    finally:
        ledger.refuse(problem.name, str(problem))


def rewrite(
    weights: Iterable[tuple[str, T]],
    ledger: Ledger,
    *,
    check: bool = True,
    scalar: Callable[[T], float] | None = None,
    on_problem: Callable[[CheckpointError], None] = _raise,
    fold: Fold | None = None,
    final: bool = False,
    awq: Awq | None = None,
) -> Generator[tuple[str, T], None, None]:
    """Yield ``(vLLM name, tensor)`` for each checkpoint ``(name, tensor)``.

    With ``check``, a tensor that ``verify.check_tensor`` refuses goes to ``on_problem``
    (which raises by default) and, if that returns, is recorded as refused, not forwarded.
    ``scalar`` reads a per-expert scalar scale's value for ``verify.check_complete``.
    ``fold`` (harmonization) takes gate/up block and global scales and gives back what to
    forward, possibly later; when the stream ends it forwards what still waits (``final``: a
    full load, which forgets it).  ``awq`` (a whole NVFP4_AWQ checkpoint) takes every
    ``pre_quant_scale`` and the tensors its folds change; down_proj's p goes to ``fold`` with up's
    scales.  Everything else is forwarded at once, by identity.
    ``ledger.seconds`` gets the time spent here.
    """
    clock = perf_counter
    family = ledger.family
    # (projection, suffix as written) -> the fold's kind of piece: gate/up block and global scales
    pieces = (
        {}
        if fold is None
        else {(proj, suffix): kind for suffix, kind in PIECES.get(family or "", {}).items() for proj in _FOLDED}
    )
    spent = 0.0
    try:
        for name, tensor in weights:
            started = clock()
            parsed = parse(name)
            if check:
                problem = verify.check_tensor(ledger, name, parsed)
                if problem is not None:
                    try:
                        on_problem(problem)
                    finally:
                        ledger.refuse(name, str(problem))
                        spent += clock() - started
                    continue
            new = rename(name, parsed, family)
            if parsed is None or parsed.layout == FUSED:
                out = None
                if awq is not None and parsed is None:
                    try:
                        out = (
                            awq.o_p(name, awq.p(name, "o_proj", tensor))
                            if name.endswith(_O_P)
                            else awq.take(name, tensor)
                        )
                    except CheckpointError as problem:
                        _refused(problem, ledger, on_problem)
                        spent += clock() - started
                        continue
                ledger.record(name, new, parsed)
                spent += clock() - started
                if out is None:
                    yield new, tensor
                else:
                    yield from out
                continue
            if awq is not None and parsed.suffix == AWQ_SUFFIX:
                try:
                    p = awq.p(name, parsed.proj, tensor)
                except CheckpointError as problem:
                    _refused(problem, ledger, on_problem)
                    spent += clock() - started
                    continue
                ledger.record(name, new, parsed)
                if parsed.proj in _FOLDED:
                    out = awq.expert_p(parsed.prefix, parsed.expert, parsed.proj, name, p)
                else:  # down_proj's: folded with up's block scales
                    out = fold.take(parsed.prefix, parsed.expert, parsed.proj, "rows", name, p, None) if fold else []
                spent += clock() - started
                yield from out
                continue
            value = None
            if scalar is not None and parsed.suffix in SCALAR_SUFFIXES:
                try:
                    value = scalar(tensor)
                except Exception:  # several elements, say: not one usable value
                    value = math.nan
            ledger.record(name, new, parsed, value)
            kind = pieces.get((parsed.proj, parsed.suffix)) if pieces else None
            if kind is not None:
                out = fold.take(parsed.prefix, parsed.expert, parsed.proj, kind, new, tensor, value)  # type: ignore[union-attr]
                spent += clock() - started
                yield from out
                continue
            spent += clock() - started
            yield new, tensor
        if fold is not None:
            started = clock()
            rest = fold.drop() if final else fold.flush()
            spent += clock() - started
            yield from rest
        if awq is not None:
            started = clock()
            rest = awq.drop()
            spent += clock() - started
            yield from rest
    finally:
        ledger.seconds += spent
