"""Harmonization: with vLLM's one-scale-for-w13 semantics, both halves dequantize as the checkpoint says."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import checkpoints  # noqa: E402

from vllm_modelopt_shim.harmonize import FP8_MAX, fold  # noqa: E402

ROWS, K = 64, 256


def expert(up_factor: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """One expert's gate and up, really NVFP4-quantized each with its own global scale (as ModelOpt does)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(ROWS, K, generator=g) * 0.05
    up = torch.randn(ROWS, K, generator=g) * 0.05 * up_factor
    (gp, gs, g2), (up_, us, u2) = checkpoints.quantize(gate), checkpoints.quantize(up)
    return {
        "packed": torch.cat([gp, up_])[None],
        "scales": torch.cat([gs, us])[None],
        "s2": torch.stack([g2, u2])[None],
        "gate": checkpoints.dequantize(gp, gs, float(g2)),
        "up": checkpoints.dequantize(up_, us, float(u2)),
    }


def vllm_dequant(packed: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM computes: both w13 halves at the gate column's global scale."""
    w = checkpoints.dequantize(packed[0], scales[0], float(s2[0, 0]))
    return w[:ROWS], w[ROWS:]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_without_harmonization_up_is_off_by_the_scale_ratio() -> None:
    x = expert(1.3)  # gate/up global scales 13.9% apart, as the worst measured expert
    gate, up = vllm_dequant(x["packed"], x["scales"], x["s2"])
    g, u = float(x["s2"][0, 0]), float(x["s2"][0, 1])
    assert rel(gate, x["gate"]) == 0.0
    assert rel(up, x["up"]) == pytest.approx(abs(g - u) / u, rel=1e-4) and abs(g - u) / u > 0.05


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("factor", [1.14, 0.88, 1.3, 0.5, 2.0])
def test_both_halves_match_the_checkpoint_within_fp8_rounding(factor: float, seed: int) -> None:
    x = expert(factor, seed)
    result = fold(x["scales"], x["s2"], x["packed"], reciprocal=False)
    gate, up = vllm_dequant(x["packed"], x["scales"], x["s2"])
    assert result.harmonized == 1
    assert rel(gate, x["gate"]) <= 0.02 and rel(up, x["up"]) <= 0.04  # issue targets: gate 2%, up 4%
    assert result.worst_after == pytest.approx(max(rel(gate, x["gate"]), rel(up, x["up"])), rel=1e-3)
    assert float(x["s2"][0, 0]) == float(x["s2"][0, 1])


def test_gate_stays_exact_when_up_fits_under_gates_scale() -> None:
    x = expert(0.88)
    before = x["scales"][0, :ROWS].clone()
    fold(x["scales"], x["s2"], x["packed"], reciprocal=False)
    assert torch.equal(x["scales"][0, :ROWS].view(torch.uint8), before.view(torch.uint8))
    gate, _ = vllm_dequant(x["packed"], x["scales"], x["s2"])
    assert rel(gate, x["gate"]) == 0.0


def test_block_scales_never_exceed_fp8_max() -> None:
    x = expert(3.0)
    fold(x["scales"], x["s2"], x["packed"], reciprocal=False)
    values = x["scales"].float()
    assert bool(torch.isfinite(values).all()) and float(values.max()) <= FP8_MAX


def test_compressed_tensors_global_scales_are_reciprocal() -> None:
    x = expert(1.14)
    gs = 1.0 / x["s2"]  # compressed-tensors stores the divisor
    fold(x["scales"], gs, x["packed"], reciprocal=True)
    gate, up = vllm_dequant(x["packed"], x["scales"], 1.0 / gs)
    assert rel(gate, x["gate"]) <= 0.02 and rel(up, x["up"]) <= 0.04
    assert float(gs[0, 0]) == float(gs[0, 1])


def test_equal_scales_are_left_byte_identical() -> None:
    x = expert(1.0)
    x["s2"][0, 1] = x["s2"][0, 0]
    before = x["scales"].clone()
    result = fold(x["scales"], x["s2"], x["packed"], reciprocal=False)
    assert result.harmonized == 0 and torch.equal(x["scales"].view(torch.uint8), before.view(torch.uint8))
