"""Verification: every bad input is refused with an error that names the tensor and says what to do.

Pure: the 'tensors' here are plain floats (the scalar scale value, or 1.0), so this runs in milliseconds.
"""

from __future__ import annotations

import math

import pytest

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
from vllm_modelopt_shim.names import COMPRESSED, MODELOPT, UNQUANTIZED, parse
from vllm_modelopt_shim.stream import rewrite
from vllm_modelopt_shim.verify import check_complete, check_tensor, summarize

L0 = "model.language_model.layers.0.mlp"
MODELOPT_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


def checkpoint(
    experts: int = 4, layers: int = 2, layout: str = "legacy", suffixes: tuple[str, ...] = MODELOPT_SUFFIXES
) -> list[tuple[str, float]]:
    names: list[tuple[str, float]] = [("model.language_model.embed_tokens.weight", 1.0)]
    for layer in range(layers):
        p = f"model.language_model.layers.{layer}.mlp"
        names.append((f"{p}.gate.weight", 1.0))
        for e in range(experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for s in suffixes:
                    mid = f"{proj}.{e}" if layout == "legacy" else f"{e}.{proj}"
                    names.append((f"{p}.experts.{mid}.{s}", 0.01 + e / 100))
    return names


def load(
    names: list[tuple[str, float]], family: str | None = MODELOPT, experts: int | None = 4
) -> tuple[list[str], Ledger]:
    """What the runtime does: stream through rewrite (raising), then check completeness (raising)."""
    ledger = Ledger(family, experts)
    out = [n for n, _ in rewrite(names, ledger, scalar=float)]
    problems = check_complete(ledger)
    if problems:
        raise summarize(problems)
    return out, ledger


def test_a_whole_legacy_checkpoint_is_renamed_and_verified() -> None:
    out, ledger = load(checkpoint())
    assert ledger.seen == len(out) == 1 + 2 * (1 + 4 * 3 * 4)
    assert ledger.renamed == 2 * 4 * 3 * 4
    assert f"{L0}.experts.3.down_proj.input_scale" in out
    assert ledger.complete_experts() == 8
    assert ledger.layouts == {"legacy": 96}


def test_tensors_are_forwarded_by_identity_in_order() -> None:
    objs = [("a.weight", object()), (f"{L0}.experts.gate_proj.0.weight", object())]
    ledger = Ledger(MODELOPT, 4)
    out = list(rewrite(objs, ledger, check=False))
    assert [t for _, t in out] == [t for _, t in objs]
    assert all(a is b for (_, a), (_, b) in zip(out, objs, strict=True))


def test_stream_is_lazy() -> None:
    pulled: list[str] = []

    def source():
        for name, value in checkpoint():
            pulled.append(name)
            yield name, value

    it = rewrite(source(), Ledger(MODELOPT, 4), scalar=float)
    next(it)
    assert len(pulled) == 1


def test_expert_index_out_of_range_is_refused_before_vllm_sees_it() -> None:
    names = checkpoint()
    bad = f"{L0}.experts.gate_proj.4.weight"
    names.insert(5, (bad, 1.0))
    forwarded: list[str] = []
    with pytest.raises(ExpertIndexError) as info:
        for name, _ in rewrite(names, Ledger(MODELOPT, 4), scalar=float):
            forwarded.append(name)
    assert info.value.name == bad
    assert bad in str(info.value) and "4 experts" in str(info.value)
    assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)
    assert f"{L0}.experts.4.gate_proj.weight" not in forwarded


def test_duplicate_expert_tensor_in_both_layouts_is_refused_before_forwarding() -> None:
    names = checkpoint()
    dup = f"{L0}.experts.1.up_proj.weight_scale"
    names.append((dup, 1.0))
    with pytest.raises(DuplicateTensorError) as info:
        load(names)
    assert info.value.name == dup and "twice" in str(info.value)
    assert f"already read as {L0}.experts.up_proj.1.weight_scale" in str(info.value)


def test_weight_packed_and_weight_for_the_same_expert_are_duplicates() -> None:
    names = checkpoint()
    names.append((f"{L0}.experts.gate_proj.0.weight_packed", 1.0))
    with pytest.raises(DuplicateTensorError):
        load(names)


@pytest.mark.parametrize(
    "bad",
    [f"{L0}.experts.gate_proj.0.pre_quant_scale", "model.language_model.layers.0.self_attn.o_proj.pre_quant_scale"],
)
@pytest.mark.parametrize("full", [True, False])
def test_awq_pre_quant_scale_is_refused_unless_folding(bad: str, full: bool) -> None:
    """Without the AWQ folds (AWQ=refuse, a config saying NVFP4, a weight update) p is refused, naming it
    and saying what to do: fold while loading, or serve a converted copy."""
    names = checkpoint()
    names.insert(3, (bad, 1.0))
    ledger = Ledger(MODELOPT, 4, full=full)
    with pytest.raises(UnsupportedTensorError) as info:
        list(rewrite(names, ledger, scalar=float))
    message = str(info.value)
    assert info.value.name == bad and "NVFP4_AWQ" in message and "vllm-modelopt-shim convert SRC DST" in message
    assert ("VLLM_MODELOPT_SHIM_AWQ=fold" in message) is full
    assert ("weight update cannot carry" in message) is not full


def test_while_folding_only_the_p_the_folds_take_pass() -> None:
    """Experts' and o_proj's p pass check_tensor when the AWQ folds are on; any other p is still refused."""
    ledger = Ledger(MODELOPT, 4, full=True)
    ledger.awq = True
    for name in (f"{L0}.experts.gate_proj.0.pre_quant_scale", f"{L0}.experts.0.down_proj.pre_quant_scale"):
        assert check_tensor(ledger, name, parse(name)) is None
    attention = "model.language_model.layers.0.self_attn"
    assert check_tensor(ledger, f"{attention}.o_proj.pre_quant_scale", None) is None
    refused = check_tensor(ledger, f"{attention}.q_proj.pre_quant_scale", None)
    assert isinstance(refused, UnsupportedTensorError) and refused.name == f"{attention}.q_proj.pre_quant_scale"


def test_fused_and_per_expert_tensors_in_one_model_are_refused() -> None:
    names = checkpoint()
    fused = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    names.append((fused, 1.0))
    with pytest.raises(MixedLayoutError) as info:
        load(names)
    assert info.value.name == fused and "one expert layout" in str(info.value)


def test_per_expert_after_fused_is_refused_too() -> None:
    names = [(f"{L0}.experts.gate_up_proj", 1.0), (f"{L0}.experts.down_proj", 1.0)]
    names.append((f"{L0}.experts.gate_proj.0.weight", 1.0))
    with pytest.raises(MixedLayoutError):
        load(names, family=UNQUANTIZED)


def test_suffix_of_the_other_family_is_refused_never_mixed() -> None:
    names = checkpoint()
    bad = f"{L0}.experts.gate_proj.0.weight_global_scale"
    names.insert(4, (bad, 1.0))
    with pytest.raises(MixedLayoutError) as info:
        load(names)
    assert info.value.name == bad and "compressed-tensors" in str(info.value) and "reciprocals" in str(info.value)


def test_suffix_of_no_family_is_refused_not_dropped() -> None:
    names = checkpoint()
    bad = f"{L0}.experts.gate_proj.0.weight_zero_point"
    names.insert(4, (bad, 1.0))
    with pytest.raises(UnsupportedTensorError) as info:
        load(names)
    assert info.value.name == bad


def test_missing_expert_scale_is_named_with_the_count() -> None:
    names = [n for n in checkpoint() if n[0] != f"{L0}.experts.gate_proj.2.weight_scale_2"]
    with pytest.raises(MissingTensorError) as info:
        load(names)
    assert info.value.name == f"{L0}.experts.gate_proj.2.weight_scale_2"
    assert "1 tensor(s) missing" in str(info.value)


def test_missing_whole_expert_lists_every_tensor() -> None:
    names = [n for n in checkpoint() if ".3." not in n[0] or "layers.1" in n[0]]
    with pytest.raises(MissingTensorError) as info:
        load(names)
    assert "12 tensor(s) missing" in str(info.value)
    assert info.value.name.startswith(f"{L0}.experts.") and ".3." in info.value.name


def test_missing_canonical_tensor_is_named_in_canonical_spelling() -> None:
    names = [n for n in checkpoint(layout="canonical") if n[0] != f"{L0}.experts.1.down_proj.weight"]
    with pytest.raises(MissingTensorError) as info:
        load(names)
    assert info.value.name == f"{L0}.experts.1.down_proj.weight"


def test_router_without_experts_means_a_missing_shard() -> None:
    names = [n for n in checkpoint() if not n[0].startswith("model.language_model.layers.1.mlp.experts")]
    with pytest.raises(MissingTensorError) as info:
        load(names)
    assert "model.language_model.layers.1.mlp.gate.weight" in str(info.value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
@pytest.mark.parametrize("suffix", ["weight_scale_2", "input_scale"])
def test_unusable_modelopt_scales_are_refused(value: float, suffix: str) -> None:
    bad = f"{L0}.experts.up_proj.1.{suffix}"
    names = [(n, value if n == bad else v) for n, v in checkpoint()]
    with pytest.raises(UnusableScaleError) as info:
        load(names)
    assert info.value.name == bad and "one finite value > 0" in str(info.value)


@pytest.mark.parametrize("suffix", ["weight_global_scale", "input_global_scale"])
def test_unusable_compressed_tensors_scales_are_refused(suffix: str) -> None:
    bad = f"{L0}.experts.down_proj.0.{suffix}"
    names = [(n, 0.0 if n == bad else v) for n, v in checkpoint(suffixes=CT_SUFFIXES)]
    with pytest.raises(UnusableScaleError) as info:
        load(names, family=COMPRESSED)
    assert info.value.name == bad


def test_many_problems_become_one_error_listing_them() -> None:
    names = [(n, 0.0 if n.endswith("input_scale") else v) for n, v in checkpoint()]
    with pytest.raises(UnusableScaleError) as info:
        load(names)
    assert "24 checkpoint problems" in str(info.value) and "14 more" in str(info.value)


def test_warn_mode_refuses_the_tensor_and_reports_it() -> None:
    names = checkpoint()
    bad = f"{L0}.experts.gate_proj.9.weight"
    names.insert(3, (bad, 1.0))
    seen: list[CheckpointError] = []
    ledger = Ledger(MODELOPT, 4)
    out = [n for n, _ in rewrite(names, ledger, scalar=float, on_problem=seen.append)]
    assert [p.name for p in seen] == [bad]
    assert ledger.refused and ledger.refused[0][0] == bad
    assert len(out) == len(names) - 1


def test_unknown_expert_count_uses_the_highest_index_seen() -> None:
    names = [n for n in checkpoint() if n[0] != f"{L0}.experts.down_proj.3.weight"]
    with pytest.raises(MissingTensorError):
        load(names, experts=None)


def test_canonical_and_fused_checkpoints_pass_untouched() -> None:
    out, ledger = load(checkpoint(layout="canonical"))
    assert ledger.renamed == 0
    fused = [(f"{L0}.gate.weight", 1.0), (f"{L0}.experts.gate_up_proj", 1.0), (f"{L0}.experts.down_proj", 1.0)]
    out, ledger = load(fused, family=UNQUANTIZED)
    assert out == [n for n, _ in fused] and ledger.renamed == 0
