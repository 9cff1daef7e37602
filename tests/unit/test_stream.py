"""The stream's fast path: every MoE layer after the first decides exactly like the general path.

The first layer's tensors go through ``verify`` one by one; later layers are matched against
``Ledger.expect``.  Damage placed in any layer must give the same error, naming the same tensor.
Pure: the 'tensors' are plain floats, as in test_verify.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_modelopt_shim import (
    DuplicateTensorError,
    ExpertIndexError,
    MissingTensorError,
    MixedLayoutError,
    UnsupportedTensorError,
    UnusableScaleError,
)
from vllm_modelopt_shim.errors import CheckpointError
from vllm_modelopt_shim.ledger import Layer, Ledger
from vllm_modelopt_shim.names import MODELOPT, canonical, legacy
from vllm_modelopt_shim.stream import rewrite
from vllm_modelopt_shim.verify import check_complete, summarize

SUFFIXES = ("input_scale", "weight", "weight_scale", "weight_scale_2")  # the order safetensors sorts them in
LAYERS = 3


def prefix(layer: int) -> str:
    return f"model.language_model.layers.{layer}.mlp.experts"


def checkpoint(experts: int = 4, layout: str = "legacy") -> list[tuple[str, float]]:
    names: list[tuple[str, float]] = []
    for layer in range(LAYERS):
        for proj in ("down_proj", "gate_proj", "up_proj"):
            for e in range(experts):
                for s in SUFFIXES:
                    mid = f"{proj}.{e}" if layout == "legacy" else f"{e}.{proj}"
                    names.append((f"{prefix(layer)}.{mid}.{s}", 0.5 + e / 100))
        names.append((f"model.language_model.layers.{layer}.mlp.gate.weight", 1.0))
        names.append((f"model.language_model.layers.{layer}.self_attn.q_proj.weight", 1.0))
    return names


def load(names: list[tuple[str, float]], experts: int | None = 4, check: bool = True) -> tuple[list[str], Ledger]:
    ledger = Ledger(MODELOPT, experts)
    out = [n for n, _ in rewrite(names, ledger, check=check, scalar=float)]
    if check and (problems := check_complete(ledger)):
        raise summarize(problems)
    return out, ledger


def after(names: list[tuple[str, float]], anchor: str, extra: tuple[str, float]) -> list[tuple[str, float]]:
    at = [n for n, _ in names].index(anchor) + 1
    return [*names[:at], extra, *names[at:]]


def test_every_layer_after_the_first_takes_the_fast_path() -> None:
    names = checkpoint()
    out, ledger = load(names)
    assert out == [canonical(n) for n, _ in names]
    assert ledger.complete_experts() == LAYERS * 4 and ledger.seen == len(names)
    assert ledger.renamed == LAYERS * 48 and ledger.layouts == {"legacy": LAYERS * 48}
    # the fast table holds each expert-relative name once, learned in layer 0
    assert len(ledger.fast) == 48 and "gate_proj.3.weight_scale_2" in ledger.fast


def damage(kind: str, layer: int) -> tuple[list[tuple[str, float]], str]:
    """A checkpoint damaged in ``layer``, and the tensor the error must name."""
    names = checkpoint()
    p = prefix(layer)
    if kind == "zero scale":
        bad = f"{p}.up_proj.1.input_scale"
        return [(n, 0.0 if n == bad else v) for n, v in names], bad
    if kind == "nan scale":
        bad = f"{p}.gate_proj.2.weight_scale_2"
        return [(n, math.nan if n == bad else v) for n, v in names], bad
    if kind == "same name twice":
        bad = f"{p}.down_proj.1.weight"
        return after(names, bad, (bad, 1.0)), bad
    if kind == "both layouts":
        bad = f"{p}.2.up_proj.weight_scale"  # canonical copy of a legacy tensor already read
        return after(names, f"{p}.up_proj.2.weight_scale", (bad, 1.0)), bad
    if kind == "expert out of range":
        bad = f"{p}.gate_proj.4.weight"
        return after(names, f"{p}.gate_proj.3.weight", (bad, 1.0)), bad
    if kind == "missing":
        bad = f"{p}.down_proj.3.weight_scale"
        return [(n, v) for n, v in names if n != bad], bad
    if kind == "awq":
        bad = f"{p}.gate_proj.0.pre_quant_scale"
        return after(names, f"{p}.gate_proj.0.weight", (bad, 1.0)), bad
    if kind == "other family":
        bad = f"{p}.up_proj.0.weight_global_scale"
        return after(names, f"{p}.up_proj.0.weight", (bad, 1.0)), bad
    raise AssertionError(kind)


ERRORS: dict[str, type[CheckpointError]] = {
    "zero scale": UnusableScaleError,
    "nan scale": UnusableScaleError,
    "same name twice": DuplicateTensorError,
    "both layouts": DuplicateTensorError,
    "expert out of range": ExpertIndexError,
    "missing": MissingTensorError,
    "awq": UnsupportedTensorError,
    "other family": MixedLayoutError,
}


@pytest.mark.parametrize("layer", range(LAYERS))
@pytest.mark.parametrize("kind", ERRORS)
def test_damage_in_any_layer_gives_the_same_error(kind: str, layer: int) -> None:
    names, bad = damage(kind, layer)
    with pytest.raises(ERRORS[kind]) as info:
        load(names)
    assert info.value.name == bad


@pytest.mark.parametrize("layer", range(LAYERS))
def test_a_duplicate_is_never_forwarded_twice(layer: int) -> None:
    names, bad = damage("same name twice", layer)
    ledger, forwarded, problems = Ledger(MODELOPT, 4), [], []
    forwarded = [n for n, _ in rewrite(names, ledger, scalar=float, on_problem=problems.append)]
    assert forwarded.count(canonical(bad)) == 1 and [p.name for p in problems] == [bad]
    assert ledger.refused == [(bad, str(problems[0]))]


def test_with_verification_off_every_tensor_is_forwarded_and_counted() -> None:
    names, bad = damage("same name twice", 2)
    out, ledger = load(names, check=False)
    assert out == [canonical(n) for n, _ in names] and out.count(canonical(bad)) == 2
    assert ledger.seen == len(names) and ledger.renamed == LAYERS * 48 + 1


def test_a_layer_split_across_shards_is_not_a_duplicate() -> None:
    names = checkpoint()
    half = len(names) // 2
    shard1, shard2 = names[:half], names[half:]
    mid = [(n, v) for n, v in shard2 if n.startswith(prefix(1) + ".")][:7]  # layer 1 resumes later
    out, ledger = load([*shard1, *[x for x in shard2 if x not in mid], *mid])
    assert sorted(out) == sorted(canonical(n) for n, _ in names)
    assert ledger.complete_experts() == LAYERS * 4


def test_fused_after_per_expert_layers_is_refused() -> None:
    names = checkpoint()
    bad = f"{prefix(2)}.gate_up_proj"
    with pytest.raises(MixedLayoutError) as info:
        load([*names[:60], (bad, 1.0), *names[60:]])
    assert info.value.name == bad


def test_more_experts_than_the_default_width_without_a_count() -> None:
    _, ledger = load(checkpoint(experts=300), experts=None)
    assert ledger.expected_experts() == 300 and ledger.complete_experts() == LAYERS * 300


@settings(max_examples=60, deadline=None)
@given(
    layouts=st.lists(st.sampled_from(["legacy", "canonical"]), min_size=LAYERS, max_size=LAYERS),
    seed=st.integers(0, 2**32 - 1),
    shuffle=st.booleans(),
)
def test_any_mix_of_layouts_and_orders_loads_like_one_by_one(layouts: list[str], seed: int, shuffle: bool) -> None:
    """Per layer, either layout; in checkpoint order or shuffled: the output is canonical() of each name."""
    names = []
    for n, v in checkpoint():
        layer = next((i for i in range(LAYERS) if n.startswith(prefix(i) + ".")), None)
        names.append(
            ((legacy(canonical(n)) if layouts[layer] == "legacy" else canonical(n)) if layer is not None else n, v)
        )
    if shuffle:
        random.Random(seed).shuffle(names)
    out, ledger = load(names)
    assert out == [canonical(n) for n, _ in names]
    assert ledger.complete_experts() == LAYERS * 4 and ledger.seen == len(names)
    assert ledger.renamed == 48 * layouts.count("legacy")


@pytest.mark.parametrize("layer", range(LAYERS))
def test_a_scale_that_is_not_one_value_is_refused_by_name_not_crashed_on(layer: int) -> None:
    bad = f"{prefix(layer)}.down_proj.2.weight_scale_2"
    names: list[tuple[str, object]] = [(n, [0.5, 0.5] if n == bad else v) for n, v in checkpoint()]
    ledger = Ledger(MODELOPT, 4)
    for _ in rewrite(names, ledger, scalar=float):  # float([0.5, 0.5]) raises, as Tensor.item does
        pass
    problems = check_complete(ledger)
    assert [type(p) for p in problems] == [UnusableScaleError] and problems[0].name == bad
    assert "nan" in str(problems[0])


def test_the_time_spent_is_estimated_within_the_wall_time_of_the_stream() -> None:
    """Fast-path tensors are timed on samples: the estimate is never zero, never beyond the whole."""
    ledger = Ledger(MODELOPT, 64)
    started = time.perf_counter()
    for _ in rewrite(checkpoint(experts=64), ledger, scalar=float):
        pass
    assert 0.0 < ledger.seconds <= time.perf_counter() - started


ALL_SLOTS = {(p, s) for p in ("down_proj", "gate_proj", "up_proj") for s in ("input_scale", "weight_scale_2")}


@pytest.mark.parametrize(
    "handed", [ALL_SLOTS, set(), {("down_proj", "input_scale"), ("gate_proj", "weight_scale_2")}], ids=len
)
def test_the_first_layers_scales_decide_which_are_read_here(handed: set[tuple[str, str]]) -> None:
    """``handover`` sees the first MoE layer, with its values read, once; the slots it names stop being read."""
    reads: list[str] = []
    asked: list[tuple[str, int]] = []

    def handover(layer: Layer) -> set[tuple[str, str]]:
        asked.append((layer.prefix, len(layer.scalars)))
        return handed

    ledger = Ledger(MODELOPT, 4)
    names = checkpoint()
    tagged = [(n, float(i)) for i, (n, _) in enumerate(names)]  # the value says which tensor was read

    def read(value: float) -> float:
        reads.append(tagged[int(value)][0])
        return value

    out = [n for n, _ in rewrite(tagged, ledger, scalar=read, handover=handover)]
    assert asked == [(prefix(0), 4 * 3 * 2)]  # layer 0's 24 scales, before layer 1 is forwarded
    assert len(out) == len(names) and ledger.handed == handed and ledger.deferred is bool(handed)
    later = [n for n in reads if not n.startswith(prefix(0) + ".")]
    # layer 1's first tensor (down_proj.0.input_scale) is read before the stream knows it left layer 0
    first = f"{prefix(1)}.down_proj.0.input_scale"
    assert all(n == first or (n.split(".")[-3], n.split(".")[-1]) not in handed for n in later)
    assert len(later) == 1 + (LAYERS - 1) * 4 * (6 - len(handed)) - (("down_proj", "input_scale") not in handed)
    unread = list(ledger.unread(ledger.layers[prefix(1)]))
    assert {(proj, suffix) for _, _, proj, suffix in unread} == handed
