"""What the weight stream contained: per MoE layer, which expert x projection x suffix arrived.

Pure bookkeeping, no decisions (those live in ``verify``).  Compact and flat on purpose: a
30B-A3B checkpoint streams 73,728 expert tensors between vLLM's own reads and copies, so
each layer is one bytearray with a byte per (expert, projection x suffix slot) and each
scalar scale one dict entry keyed by that byte's index.
"""

from __future__ import annotations

from .names import CANONICAL, FUSED, LEGACY, PROJECTIONS, SCALAR_SUFFIXES, ExpertName, canonical_suffix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["KINDS", "STRIDE", "Layer", "Ledger"]

#: how a per-expert tensor was written; a recorded tensor's byte holds its index + 1
KINDS = (LEGACY, "canonical-renamed", CANONICAL)  # legacy is always renamed; canonical only `weight_packed`
#: slots per expert in ``Layer.marks`` (3 projections x at most 4 suffixes in every known family)
STRIDE = 16
#: default width of a layer, in experts, when the config does not say; and the most it grows to
_EXPERTS = 256
_MOST = 65536 * STRIDE
_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: recorded -> 1


class Layer:
    """One MoE layer's per-expert tensors (prefix ends in ``.experts``)."""

    __slots__ = ("extra", "marks", "prefix", "scalars")

    def __init__(self, prefix: str, width: int) -> None:
        self.prefix = prefix
        self.marks = bytearray(width)  # expert * STRIDE + slot -> 0, or KINDS index + 1
        self.scalars: dict[int, float] = {}  # expert * STRIDE + slot -> value
        self.extra = [0, 0, 0]  # per KINDS entry: tensors recorded over a marked slot (verification off)

    @property
    def counts(self) -> list[int]:
        """Tensors recorded, per KINDS entry."""
        return [self.marks.count(k + 1) + extra for k, extra in enumerate(self.extra)]

    @property
    def seen(self) -> int:
        return sum(self.counts)

    @property
    def renamed(self) -> int:
        legacy, renamed, _ = self.counts
        return legacy + renamed

    @property
    def layouts(self) -> set[str]:
        """Per-expert layouts seen in this layer (legacy, canonical)."""
        legacy, renamed, canonical = self.counts
        return {layout for layout, n in ((LEGACY, legacy), (CANONICAL, renamed + canonical)) if n}

    def mask(self, expert: int) -> int:
        """Bitmask of the slots recorded for ``expert``."""
        row = self.marks[expert * STRIDE : (expert + 1) * STRIDE].translate(_NONZERO)
        return sum(1 << slot for slot, on in enumerate(row) if on)

    def complete(self, full: int, experts: int) -> int:
        """How many of experts 0..experts-1 hold exactly the ``full`` slot mask."""
        row = bytes((full >> slot) & 1 for slot in range(STRIDE))
        marks = self.marks.translate(_NONZERO)
        if marks[: experts * STRIDE] == row * experts:  # the common case, in one comparison
            return experts
        return sum(marks[e * STRIDE : (e + 1) * STRIDE] == row for e in range(experts))

    def name(self, expert: int, proj: str, suffix: str, layout: str | None = None) -> str:
        """A tensor's name as this layer's checkpoint spells it (legacy, if it has any legacy name)."""
        if (layout or (LEGACY if LEGACY in self.layouts else CANONICAL)) == LEGACY:
            return f"{self.prefix}.{proj}.{expert}.{suffix}"
        return f"{self.prefix}.{expert}.{proj}.{suffix}"


class Ledger:
    """Counts, coverage and scalar scale values of one load (or one doctor run)."""

    def __init__(self, family: str | None, num_experts: int | None, *, full: bool = False) -> None:
        self.family = family
        self.num_experts = num_experts
        self.full = full  # a whole checkpoint (patch.full_load), not a weight update
        self.awq = False  # NVFP4_AWQ folds on: pre_quant_scale tensors are taken, not refused
        #: every layer starts with room for this many (expert, slot) marks
        self.width = (num_experts if num_experts is not None else _EXPERTS) * STRIDE
        self.layers: dict[str, Layer] = {}
        self.fused: dict[str, str] = {}  # experts prefix -> first fused tensor name
        self.routers: dict[str, str] = {}  # experts prefix implied by a router -> router name
        self.slots: dict[tuple[str, str], int] = {}  # (proj, canonical suffix) -> slot
        self._slots: dict[tuple[str, str], int] = {}  # (proj, suffix as written) -> slot
        self.refused: list[tuple[str, str]] = []  # (tensor, reason): not forwarded to vLLM
        self.others = 0  # tensors recorded outside per-expert layers (dense, router, fused)
        self.others_renamed = 0
        self.fused_seen = 0
        self.seconds = 0.0  # time spent in the shim itself (not in vLLM or disk reads)

    @property
    def seen(self) -> int:
        return self.others + len(self.refused) + sum(layer.seen for layer in self.layers.values())

    @property
    def renamed(self) -> int:
        return self.others_renamed + sum(layer.renamed for layer in self.layers.values())

    @property
    def layouts(self) -> dict[str, int]:
        """Expert layout -> tensors recorded in it."""
        counts = {LEGACY: 0, CANONICAL: 0, FUSED: self.fused_seen}
        for layer in self.layers.values():
            legacy, renamed, canonical = layer.counts
            counts[LEGACY] += legacy
            counts[CANONICAL] += renamed + canonical
        return {layout: n for layout, n in counts.items() if n}

    # -- recording -------------------------------------------------------------------------
    def slot(self, proj: str, suffix: str) -> int:
        key = (proj, suffix)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = len(self.slots)
        return slot

    def index(self, parsed: ExpertName) -> int:
        """Where this tensor's mark goes: its expert and (projection, canonical suffix) slot."""
        key = (parsed.proj, parsed.suffix)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = self.slot(parsed.proj, canonical_suffix(parsed.suffix, self.family))
        return parsed.expert * STRIDE + slot if slot < STRIDE else -1

    def has(self, parsed: ExpertName) -> bool:
        """Whether this expert tensor (in either layout or spelling) was recorded already."""
        layer = self.layers.get(parsed.prefix)
        if layer is None:
            return False
        index = self.index(parsed)
        return 0 <= index < len(layer.marks) and layer.marks[index] != 0

    def record(self, name: str, new: str, parsed: ExpertName | None, value: float | None = None) -> Layer | None:
        """Note one forwarded tensor (``value``: a scalar scale's); return its MoE layer, if any."""
        if parsed is None or parsed.layout == FUSED:
            self.others += 1
            self.others_renamed += new != name
            if parsed is not None:
                self.fused_seen += 1
                self.fused.setdefault(parsed.prefix, name)
            elif name.endswith(".mlp.gate.weight"):
                self.routers[name[: -len("gate.weight")] + "experts"] = name
            return None
        layer = self.layers.get(parsed.prefix)
        if layer is None:
            layer = self.layers[parsed.prefix] = Layer(parsed.prefix, self.width)
        kind = 0 if parsed.layout == LEGACY else 1 if new != name else 2
        slot = self._slots.get((parsed.proj, parsed.suffix))
        index = parsed.expert * STRIDE + slot if slot is not None and slot < STRIDE else self.index(parsed)
        marks = layer.marks
        if not 0 <= index < len(marks) or marks[index]:  # not the common case
            if index < 0 or index >= _MOST or index < len(marks):
                layer.extra[kind] += 1  # counted, not tracked: an odd slot or index, or a second copy (verify off)
                return layer
            marks.extend(bytes(index + STRIDE - len(marks)))  # an expert beyond the config's count (verify off)
        marks[index] = kind + 1
        if value is not None and parsed.suffix in SCALAR_SUFFIXES:
            layer.scalars[index] = value
        return layer

    def refuse(self, name: str, reason: str) -> None:
        self.refused.append((name, reason))

    # -- reading ---------------------------------------------------------------------------
    def suffixes(self) -> list[str]:
        """Canonical per-expert suffixes seen anywhere, in first-seen order."""
        return list(dict.fromkeys(suffix for _, suffix in self.slots))

    def expected_experts(self) -> int:
        if self.num_experts is not None:
            return self.num_experts
        last = max((len(layer.marks.rstrip(b"\0")) for layer in self.layers.values()), default=0)
        return -(-last // STRIDE)

    def scalar(self, prefix: str, expert: int, proj: str, suffix: str) -> float | None:
        layer = self.layers.get(prefix)
        slot = self.slots.get((proj, suffix))
        if layer is None or slot is None:
            return None
        return layer.scalars.get(expert * STRIDE + slot)

    def scalars(self, where: Callable[[float], bool] | None = None) -> Iterator[tuple[str, float]]:
        """Recorded scalar scales as (checkpoint name, value); with ``where``, only the values it selects."""
        by_slot = {slot: key for key, slot in self.slots.items()}
        for layer in self.layers.values():
            for index, value in layer.scalars.items():
                if where is None or where(value):
                    proj, suffix = by_slot[index % STRIDE]
                    yield layer.name(index // STRIDE, proj, suffix), value

    def complete_experts(self) -> int:
        """(layer, expert) pairs holding every projection x suffix seen in the model."""
        full, experts = self.full_mask(), self.expected_experts()
        return sum(layer.complete(full, experts) for layer in self.layers.values())

    def full_mask(self) -> int:
        mask = 0
        for suffix in self.suffixes():
            for proj in PROJECTIONS:
                slot = self.slot(proj, suffix)
                if slot < STRIDE:
                    mask |= 1 << slot
        return mask
