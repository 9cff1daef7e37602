"""The stream: one path for every tensor, whatever the layer or the order it arrives in.

Every tensor goes through ``verify.check_tensor`` once; damage placed in any layer gives the
same error, naming the same tensor; a checkpoint split over many calls (weight updates) is never
refused for what a call lacks.  Pure: the 'tensors' are plain floats, as in test_verify.
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
from vllm_modelopt_shim.ledger import Ledger
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


def test_every_tensor_is_renamed_and_checked_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm_modelopt_shim.verify as verify

    calls: list[str] = []
    original = verify.check_tensor

    def counting(ledger: Ledger, name: str, parsed: object) -> CheckpointError | None:
        calls.append(name)
        return original(ledger, name, parsed)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "check_tensor", counting)
    names = checkpoint()
    out, ledger = load(names)
    assert out == [canonical(n) for n, _ in names]
    assert calls == [n for n, _ in names]  # every layer, not only the first
    assert ledger.complete_experts() == LAYERS * 4 and ledger.seen == len(names)
    assert ledger.renamed == LAYERS * 48 and ledger.layouts == {"legacy": LAYERS * 48}


def interleave(names: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """One tensor of each layer in turn: every tensor lands in another layer than the one before."""
    by_layer: list[list[tuple[str, float]]] = [[] for _ in range(LAYERS)]
    for n, v in names:
        by_layer[int(n.split(".layers.")[1].split(".")[0])].append((n, v))
    return [x for group in zip(*by_layer, strict=True) for x in group]


def test_layers_interleaved_or_reversed_load_like_in_order() -> None:
    names = checkpoint()
    for order in (interleave(names), names[::-1]):
        out, ledger = load(order)
        assert out == [canonical(n) for n, _ in order]
        assert ledger.complete_experts() == LAYERS * 4 and ledger.renamed == LAYERS * 48


@pytest.mark.parametrize("calls", [4, 10**9], ids=["4 buckets", "one tensor per call"])
def test_a_checkpoint_split_over_calls_is_judged_tensor_by_tensor(calls: int) -> None:
    """Weight updates: a bucket judged as an update passes; the same bucket judged as a full load is
    refused for what it lacks; together the buckets forward every tensor once."""
    names = checkpoint()
    size = max(1, -(-len(names) // calls))
    out: list[str] = []
    for start in range(0, len(names), size):
        ledger, bucket = Ledger(MODELOPT, 4), names[start : start + size]
        out += [n for n, _ in rewrite(bucket, ledger, scalar=float)]
        assert check_complete(ledger, full=False) == []
        if any(".experts." in n for n, _ in bucket):  # never a whole expert set: refused if judged whole
            assert check_complete(ledger, full=True) != []
    assert out == [canonical(n) for n, _ in names]


def test_an_update_is_refused_for_a_bad_tensor_it_holds() -> None:
    bad = f"{prefix(1)}.up_proj.1.input_scale"
    for value in (0.0, -1.0, math.inf):
        ledger = Ledger(MODELOPT, 4)
        list(rewrite([(bad, value)], ledger, scalar=float))
        (problem,) = check_complete(ledger, full=False)
        assert isinstance(problem, UnusableScaleError) and problem.name == bad
    with pytest.raises(ExpertIndexError):
        list(rewrite([(f"{prefix(0)}.gate_proj.9.weight", 1.0)], Ledger(MODELOPT, 4), scalar=float))
    ledger = Ledger(MODELOPT, 4)
    list(rewrite([(bad, math.nan)], ledger, scalar=float))  # vLLM's sparse patches mark "unchanged" with NaN
    assert check_complete(ledger, full=False) == []


def test_an_expert_parallel_rank_is_judged_on_its_own_experts() -> None:
    names = [
        (n, v) for n, v in checkpoint() if not (n.endswith(".weight") and ".proj.3." in n.replace("_proj", ".proj"))
    ]
    ledger = Ledger(MODELOPT, 4)
    list(rewrite(names, ledger, scalar=float))
    assert [type(p) for p in check_complete(ledger)] == [MissingTensorError]
    assert check_complete(ledger, experts={0, 1, 2}) == []


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


def test_the_time_spent_is_measured_within_the_wall_time_of_the_stream() -> None:
    ledger = Ledger(MODELOPT, 64)
    started = time.perf_counter()
    for _ in rewrite(checkpoint(experts=64), ledger, scalar=float):
        pass
    assert 0.0 < ledger.seconds <= time.perf_counter() - started


def test_the_folds_work_counts_as_the_shims_time_and_the_loaders_does_not() -> None:
    """``ledger.seconds`` is the time spent inside the stream and its fold, never the consumer's."""
    clock = {"now": 0.0}

    class Fold:
        def take(self, *args: object) -> list[tuple[str, object]]:
            clock["now"] += 1.0  # the fold's work
            return [(str(args[4]), args[5])]

        def flush(self) -> list[tuple[str, object]]:
            clock["now"] += 100.0  # the end of the call's work
            return []

        drop = flush

    names = [(n, v) for n, v in checkpoint(experts=2) if n.endswith("weight_scale_2") and ".down_proj." not in n]
    ledger = Ledger(MODELOPT, 2)
    import vllm_modelopt_shim.stream as stream

    real = stream.perf_counter
    stream.perf_counter = lambda: clock["now"]  # type: ignore[assignment]
    try:
        for _ in rewrite(names, ledger, scalar=float, fold=Fold(), final=True):  # type: ignore[arg-type]
            clock["now"] += 1000.0  # vLLM's own work on the tensor
    finally:
        stream.perf_counter = real
    assert ledger.seconds == len(names) * 1.0 + 100.0
