"""The weight stream rewrite: one lazy pass, names changed, tensors forwarded by identity.

Generic over the tensor type so it needs no torch: the runtime passes torch tensors and
``Tensor.item`` as ``scalar``; the doctor passes safetensors header entries.
"""

from __future__ import annotations

from time import perf_counter

from . import verify
from .errors import CheckpointError
from .ledger import Ledger
from .names import FUSED, SCALAR_SUFFIXES, parse, rename

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import TypeVar

    T = TypeVar("T")

__all__ = ["rewrite"]


def _raise(problem: CheckpointError) -> None:
    raise problem


def rewrite(
    weights: Iterable[tuple[str, T]],
    ledger: Ledger,
    *,
    check: bool = True,
    scalar: Callable[[T], float] | None = None,
    on_problem: Callable[[CheckpointError], None] = _raise,
) -> Iterator[tuple[str, T]]:
    """Yield ``(vLLM name, tensor)`` for each checkpoint ``(name, tensor)``.

    With ``check``, a tensor that ``verify.check_tensor`` refuses goes to ``on_problem``
    (which raises by default) and, if that returns, is recorded as refused, not forwarded.
    """
    family = ledger.family
    clock = perf_counter
    for name, tensor in weights:
        started = clock()
        parsed = parse(name)
        if check:
            problem = verify.check_tensor(ledger, name, parsed)
            if problem is not None:
                on_problem(problem)
                ledger.refuse(name, str(problem))
                ledger.seconds += clock() - started
                continue
        new = rename(name, parsed, family)
        value = None
        if scalar is not None and parsed is not None and parsed.suffix in SCALAR_SUFFIXES and parsed.layout != FUSED:
            value = scalar(tensor)
        ledger.record(name, new, parsed, value)
        ledger.seconds += clock() - started
        yield new, tensor
