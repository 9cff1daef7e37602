"""What the weight stream contained: per MoE layer, which expert x projection x suffix arrived.

Pure bookkeeping, no decisions (those live in ``verify``).  Compact on purpose: a
30B-A3B checkpoint streams 73,728 expert tensors, so each expert is one int bitmask of
(projection, suffix) slots and each scalar scale one dict entry keyed by an int.
"""

from __future__ import annotations

from .names import CANONICAL, FUSED, LEGACY, PROJECTIONS, ExpertName, canonical_suffix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Layer", "Ledger"]


class Layer:
    """One MoE layer's per-expert tensors (prefix ends in ``.experts``)."""

    __slots__ = ("experts", "layouts", "prefix", "renamed", "scalars", "seen")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.layouts: set[str] = set()  # per-expert layouts seen (legacy, canonical)
        self.experts: dict[int, int] = {}  # expert -> bitmask of Ledger slots
        self.scalars: dict[int, float] = {}  # (expert << 16 | slot) -> value
        self.seen = 0
        self.renamed = 0

    def name(self, expert: int, proj: str, suffix: str, layout: str | None = None) -> str:
        """A tensor's name as this layer's checkpoint spells it (legacy, if it has any legacy name)."""
        if (layout or (LEGACY if LEGACY in self.layouts else CANONICAL)) == LEGACY:
            return f"{self.prefix}.{proj}.{expert}.{suffix}"
        return f"{self.prefix}.{expert}.{proj}.{suffix}"


class Ledger:
    """Counts, coverage and scalar scale values of one load (or one doctor run)."""

    def __init__(self, family: str | None, num_experts: int | None) -> None:
        self.family = family
        self.num_experts = num_experts
        self.seen = 0
        self.renamed = 0
        self.layers: dict[str, Layer] = {}
        self.fused: dict[str, str] = {}  # experts prefix -> first fused tensor name
        self.routers: dict[str, str] = {}  # experts prefix implied by a router -> router name
        self.slots: dict[tuple[str, str], int] = {}  # (proj, canonical suffix) -> bit
        self._bits: dict[tuple[str, str], int] = {}  # (proj, suffix as written) -> bit: the hot-path cache
        self.raw_suffixes: dict[str, str] = {}  # per-expert suffix as written -> first name
        self.refused: list[tuple[str, str]] = []  # (tensor, reason): not forwarded to vLLM
        self.layouts: dict[str, int] = {}  # expert layout -> tensors seen in it
        self.seconds = 0.0  # time spent in the shim itself (not in vLLM or disk reads)

    # -- recording -------------------------------------------------------------------------
    def slot(self, proj: str, suffix: str) -> int:
        key = (proj, suffix)
        bit = self.slots.get(key)
        if bit is None:
            bit = self.slots[key] = len(self.slots)
        return bit

    def layer(self, parsed: ExpertName) -> Layer:
        layer = self.layers.get(parsed.prefix)
        if layer is None:
            layer = self.layers[parsed.prefix] = Layer(parsed.prefix)
        layer.layouts.add(parsed.layout)
        return layer

    def bit(self, parsed: ExpertName) -> int:
        """The slot of this tensor's (projection, canonical suffix), cached by its written suffix."""
        key = (parsed.proj, parsed.suffix)
        bit = self._bits.get(key)
        if bit is None:
            bit = self._bits[key] = self.slot(parsed.proj, canonical_suffix(parsed.suffix, self.family))
        return bit

    def has(self, parsed: ExpertName) -> bool:
        """Whether this expert tensor (in either layout or spelling) was recorded already."""
        layer = self.layers.get(parsed.prefix)
        return layer is not None and bool(layer.experts.get(parsed.expert, 0) >> self.bit(parsed) & 1)

    def record(self, name: str, new: str, parsed: ExpertName | None, value: float | None = None) -> None:
        """Note one forwarded tensor; ``value`` is given for scalar scales."""
        self.seen += 1
        renamed = new != name
        self.renamed += renamed
        if parsed is None:
            if name.endswith(".mlp.gate.weight"):
                self.routers[name[: -len("gate.weight")] + "experts"] = name
            return
        self.layouts[parsed.layout] = self.layouts.get(parsed.layout, 0) + 1
        if parsed.layout == FUSED:
            self.fused.setdefault(parsed.prefix, name)
            return
        self.raw_suffixes.setdefault(parsed.suffix, name)
        layer = self.layer(parsed)
        layer.seen += 1
        layer.renamed += renamed
        bit = self.bit(parsed)
        layer.experts[parsed.expert] = layer.experts.get(parsed.expert, 0) | 1 << bit
        if value is not None:
            layer.scalars[parsed.expert << 16 | bit] = value

    def refuse(self, name: str, reason: str) -> None:
        self.seen += 1
        self.refused.append((name, reason))

    # -- reading ---------------------------------------------------------------------------
    def suffixes(self) -> list[str]:
        """Canonical per-expert suffixes seen anywhere, in first-seen order."""
        return list(dict.fromkeys(suffix for _, suffix in self.slots))

    def expected_experts(self) -> int:
        if self.num_experts is not None:
            return self.num_experts
        return 1 + max((e for layer in self.layers.values() for e in layer.experts), default=-1)

    def scalar(self, prefix: str, expert: int, proj: str, suffix: str) -> float | None:
        layer = self.layers.get(prefix)
        bit = self.slots.get((proj, suffix))
        if layer is None or bit is None:
            return None
        return layer.scalars.get(expert << 16 | bit)

    def scalars(self) -> Iterator[tuple[str, float]]:
        """Every recorded scalar scale as (checkpoint name, value)."""
        by_bit = {bit: key for key, bit in self.slots.items()}
        for layer in self.layers.values():
            for key, value in layer.scalars.items():
                proj, suffix = by_bit[key & 0xFFFF]
                yield layer.name(key >> 16, proj, suffix), value

    def complete_experts(self) -> int:
        """(layer, expert) pairs holding every projection x suffix seen in the model."""
        full = self.full_mask()
        return sum(mask == full for layer in self.layers.values() for mask in layer.experts.values())

    def full_mask(self) -> int:
        mask = 0
        for suffix in self.suffixes():
            for proj in PROJECTIONS:
                mask |= 1 << self.slot(proj, suffix)
        return mask
