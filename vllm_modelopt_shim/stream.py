"""The weight stream rewrite: one lazy pass, names changed, tensors forwarded by identity.

Generic over the tensor type so it needs no torch: the runtime passes torch tensors and
``Tensor.item`` as ``scalar``; the doctor passes safetensors header entries.
"""

from __future__ import annotations

import math
from time import perf_counter

from . import verify
from .errors import CheckpointError
from .ledger import Layer, Ledger
from .names import FUSED, SCALAR_SUFFIXES, parse, rename

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable
    from typing import TypeVar

    T = TypeVar("T")

__all__ = ["rewrite", "SAMPLE"]

#: one fast-path tensor in SAMPLE is timed
SAMPLE = 7


def _raise(problem: CheckpointError) -> None:
    raise problem


def rewrite(
    weights: Iterable[tuple[str, T]],
    ledger: Ledger,
    *,
    check: bool = True,
    scalar: Callable[[T], float] | None = None,
    handover: Callable[[Layer], Iterable[tuple[str, str]]] | None = None,
    on_problem: Callable[[CheckpointError], None] = _raise,
) -> Generator[tuple[str, T], None, None]:
    """Yield ``(vLLM name, tensor)`` for each checkpoint ``(name, tensor)``, one in, one out.

    With ``check``, a tensor that ``verify.check_tensor`` refuses goes to ``on_problem``
    (which raises by default) and, if that returns, is recorded as refused, not forwarded.
    ``scalar`` reads a per-expert scalar scale's value for ``verify.check_complete``.
    ``handover`` is asked once, with the first MoE layer when the stream leaves it, which scale
    slots ((projection, suffix)) the caller can read in bulk after the load (it names only slots
    whose values, as it would read them for that layer, equal those read here, and are told apart
    from every other slot); those are no longer read here, and land in ``ledger.handed``.

    Hot path: a 30B-A3B checkpoint streams 73,728 expert tensors through here, each between
    vLLM's own reads and copies, so every cache line touched counts.  When the stream enters
    a MoE layer, ``Ledger.expect`` spells out every expert tensor name accepted in an earlier
    layer under this layer's prefix; a tensor found there costs one dict read and one byte.
    Everything else (first sights, other names, second copies, anything wrong) takes the
    general path, which decides through ``verify``.

    ``ledger.seconds`` gets the time spent here.  Every general-path tensor is timed.  A clock
    read costs about a tenth of a fast-path tensor's own work, so fast-path tensors are timed
    one in ``SAMPLE`` (prime, so no name pattern aliases) with three reads: the first two
    measure one read, which is taken off the third's interval; the work is extrapolated to
    every fast-path tensor and the reads themselves are added as spent.
    """
    expected: dict[str, tuple[str, int, int, bool]] = {}  # the current MoE layer's table: Ledger.expect
    marks: bytearray = bytearray()  # and its Layer.marks and Layer.scalars
    values: dict[int, float] = {}
    previous: Layer | None = None
    clock = perf_counter
    spent = sampled = reads = 0.0  # seconds: general path; fast-path samples; their clock reads
    fast = timed = 0  # fast-path tensors; of those, timed
    countdown = 1
    try:
        for name, tensor in weights:
            countdown -= 1
            if not countdown:
                read = clock()
                started = clock()
                read = started - read
            hit = expected.get(name)
            if hit is not None:
                new, index, mark, is_scalar = hit
                if not marks[index]:
                    marks[index] = mark
                    if is_scalar and scalar is not None:
                        try:
                            values[index] = scalar(tensor)
                        except Exception:  # several elements, say: not one usable value
                            values[index] = math.nan
                    fast += 1
                    if not countdown:
                        sampled += clock() - started - read
                        reads += 3 * read
                        timed += 1
                        countdown = SAMPLE
                    yield new, tensor
                    continue
            if countdown:
                started = clock()
            else:
                countdown = SAMPLE  # this sample went the general way, which is timed anyway
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
            new = rename(name, parsed, ledger.family)
            value = None
            if (
                parsed is not None
                and parsed.layout != FUSED
                and parsed.suffix in SCALAR_SUFFIXES
                and scalar
                and (parsed.proj, parsed.suffix) not in ledger.handed
            ):
                try:
                    value = scalar(tensor)
                except Exception:  # as above
                    value = math.nan
            layer = ledger.record(name, new, parsed, value)
            if ledger.fused:
                expected = {}  # mixed layouts: every per-expert tensor must meet verify
            elif layer is not None and layer.marks is not marks:  # entered another MoE layer
                if handover is not None and previous is not None and scalar is not None:
                    ledger.handed = frozenset(handover(previous))
                    handover = None
                expected, marks, values, previous = ledger.expect(layer), layer.marks, layer.scalars, layer
            spent += clock() - started
            yield new, tensor
    finally:
        ledger.seconds += spent + (sampled * fast / timed + reads if timed else 0.0)
