"""The expert id the EP weight filter is taught: legacy names only (canonical ids stay vLLM's)."""

from __future__ import annotations

from vllm_modelopt_shim.epfilter import expert_id

L = "model.language_model.layers.3.mlp.experts"


def test_legacy_expert_tensors_give_their_expert() -> None:
    assert expert_id(f"{L}.gate_proj.7.weight") == 7
    assert expert_id(f"{L}.down_proj.127.weight_packed") == 127
    assert expert_id(f"{L}.up_proj.0.input_scale") == 0


def test_everything_else_is_left_to_vllm() -> None:
    assert expert_id(f"{L}.7.gate_proj.weight") is None  # canonical: vLLM's own regex answers
    assert expert_id(f"{L}.gate_up_proj") is None  # fused 3-D: all experts in one tensor
    assert expert_id("model.language_model.layers.3.self_attn.q_proj.weight") is None
    assert expert_id("model.language_model.layers.3.mlp.gate.weight") is None
