"""Scale values read from vLLM's parameters after the first MoE layer: only when provably the same.

The model here is a torch module tree laid out as vLLM 0.32 lays out its MoE scale parameters
(the real vLLM classes are covered by tests/integration); a toy "loader" copies each streamed
scale where vLLM would, or somewhere else, to show both sides of the hand-over.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from vllm_modelopt_shim.ledger import Ledger  # noqa: E402
from vllm_modelopt_shim.names import MODELOPT, parse  # noqa: E402
from vllm_modelopt_shim.patch import _StoredScales  # noqa: E402
from vllm_modelopt_shim.stream import rewrite  # noqa: E402
from vllm_modelopt_shim.verify import check_complete  # noqa: E402

LAYERS, EXPERTS = 3, 4
SUFFIXES = ("input_scale", "weight", "weight_scale", "weight_scale_2")


class Experts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for suffix in ("weight_scale_2", "input_scale"):
            self.register_parameter(f"w13_{suffix}", torch.nn.Parameter(torch.full((EXPERTS, 2), -7.0)))
            self.register_parameter(f"w2_{suffix}", torch.nn.Parameter(torch.full((EXPERTS,), -7.0)))
        self.expert_map = None


def model() -> torch.nn.Module:
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.experts = torch.nn.Module()
        layer.mlp.experts.routed_experts = Experts()
        root.layers.append(layer)
    return root


def checkpoint(zero: str | None = None, shared_input: bool = False) -> list[tuple[str, Any]]:
    """``shared_input``: gate and up input scales equal, as ModelOpt writes them (one input, one amax)."""
    names = []
    for layer in range(LAYERS):
        for proj in ("down_proj", "gate_proj", "up_proj"):
            for e in range(EXPERTS):
                for s in SUFFIXES:
                    name = f"model.language_model.layers.{layer}.mlp.experts.{proj}.{e}.{s}"
                    up = proj == "up_proj" and not (shared_input and s == "input_scale")
                    value = 0.0 if name == zero else 0.25 + layer + e / 8 + up / 16
                    names.append((name, torch.tensor(value)))
    return names


def load(
    names: list[tuple[str, Any]], root: torch.nn.Module, swap_gate_up: bool = False, broadcast: bool = False
) -> Ledger:
    """What the runtime does, with a toy loader in vLLM's place."""
    ledger = Ledger(MODELOPT, EXPERTS)
    stored = _StoredScales(root, ledger)
    with torch.no_grad():
        for new, tensor in rewrite(names, ledger, scalar=torch.Tensor.item, handover=stored.handover):
            p = parse(new)
            if p is None or p.suffix not in ("weight_scale_2", "input_scale"):
                continue
            experts = root.layers[int(new.split(".")[3])].mlp.experts.routed_experts
            if p.proj == "down_proj":
                getattr(experts, f"w2_{p.suffix}")[p.expert] = tensor
            elif broadcast and p.suffix == "input_scale":  # vLLM 0.17: one value over both halves
                getattr(experts, f"w13_{p.suffix}")[p.expert] = tensor
            else:
                column = (p.proj == "up_proj") != swap_gate_up
                getattr(experts, f"w13_{p.suffix}")[p.expert, int(column)] = tensor
    if ledger.deferred:
        stored.fill()
    return ledger


def test_values_vllm_stored_as_read_are_taken_from_its_parameters() -> None:
    ledger = load(checkpoint(), model())
    assert ledger.deferred
    expected = {n: t.item() for n, t in checkpoint() if n.endswith(("scale_2", "input_scale"))}
    assert dict(ledger.scalars()) == expected and check_complete(ledger) == []


def test_a_zero_scale_after_the_hand_over_is_still_refused_by_name() -> None:
    bad = "model.language_model.layers.2.mlp.experts.gate_proj.3.input_scale"
    ledger = load(checkpoint(zero=bad), model())
    assert ledger.deferred
    (problem,) = check_complete(ledger)
    assert problem.name == bad and "= 0.0" in str(problem)


def test_values_stored_elsewhere_keep_the_stream_reading_them() -> None:
    """A loader that puts gate where up belongs: layer 0 disagrees, so no gate/up value is taken from it."""
    bad = "model.language_model.layers.2.mlp.experts.up_proj.1.weight_scale_2"
    ledger = load(checkpoint(zero=bad), model(), swap_gate_up=True)
    assert ledger.handed == {("down_proj", "input_scale"), ("down_proj", "weight_scale_2")}
    (problem,) = check_complete(ledger)
    assert problem.name == bad


@pytest.mark.parametrize("broadcast", [False, True])
def test_gate_and_up_slots_that_cannot_be_told_apart_stay_read_per_tensor(broadcast: bool) -> None:
    """Equal gate/up input scales prove nothing about which half vLLM wrote: those stay read here."""
    bad = "model.language_model.layers.2.mlp.experts.gate_proj.3.input_scale"
    ledger = load(checkpoint(zero=bad, shared_input=True), model(), broadcast=broadcast)
    assert ledger.handed == {
        ("down_proj", "input_scale"),
        ("down_proj", "weight_scale_2"),
        ("gate_proj", "weight_scale_2"),
        ("up_proj", "weight_scale_2"),
    }
    (problem,) = check_complete(ledger)  # the broadcast loader overwrote the zero with up's value
    assert problem.name == bad


def test_experts_spread_over_ranks_keep_the_stream_reading() -> None:
    root = model()
    for layer in root.layers:
        layer.mlp.experts.routed_experts.expert_map = torch.arange(EXPERTS)
    ledger = load(checkpoint(), root)
    assert not ledger.deferred and len(dict(ledger.scalars())) == LAYERS * EXPERTS * 3 * 2


def test_nan_read_and_stored_alike_counts_as_the_same() -> None:
    bad = "model.language_model.layers.0.mlp.experts.down_proj.0.weight_scale_2"
    names = [(n, torch.tensor(math.nan) if n == bad else t) for n, t in checkpoint()]
    ledger = load(names, model())
    assert ledger.deferred and [p.name for p in check_complete(ledger)] == [bad]
