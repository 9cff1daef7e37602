"""Checkpoints for the integration tests, written once per session (they take ~1 s in total)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="integration tests run inside a vLLM venv: python3 scripts/test.py")

import checkpoints
import torch

L = "model.language_model.layers"


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda ts: ts.pop(name) and None


def _zero(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(ts: dict[str, torch.Tensor]) -> None:
        ts[name] = torch.zeros_like(ts[name])

    return edit


def _extra_expert(ts: dict[str, torch.Tensor]) -> None:
    for proj in checkpoints.PROJS:
        for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            ts[f"{L}.0.mlp.experts.{proj}.4.{suffix}"] = ts[f"{L}.0.mlp.experts.{proj}.0.{suffix}"].clone()


def _duplicate(ts: dict[str, torch.Tensor]) -> None:
    ts[f"{L}.0.mlp.experts.1.up_proj.weight_scale"] = ts[f"{L}.0.mlp.experts.up_proj.1.weight_scale"].clone()


def _awq(ts: dict[str, torch.Tensor]) -> None:
    ts[f"{L}.0.mlp.experts.gate_proj.0.pre_quant_scale"] = torch.ones(checkpoints.TINY["hidden"], dtype=torch.bfloat16)  # type: ignore[call-overload]


def _fused(ts: dict[str, torch.Tensor]) -> None:
    h, i, e = checkpoints.TINY["hidden"], checkpoints.TINY["moe_intermediate"], checkpoints.TINY["experts"]
    ts[f"{L}.1.mlp.experts.gate_up_proj"] = torch.zeros(e, h, 2 * i, dtype=torch.bfloat16)  # type: ignore[call-overload]


GOOD: dict[str, dict[str, Any]] = {
    "modelopt-legacy": {"family": "modelopt", "layout": "legacy"},
    "modelopt-legacy-packed": {"family": "modelopt", "layout": "legacy", "packed_name": "weight_packed"},
    "modelopt-split": {"family": "modelopt", "layout": "legacy", "split": "gate-up-first"},
    "ct-legacy": {"family": "compressed-tensors", "layout": "legacy"},
    "modelopt-canonical": {"family": "modelopt", "layout": "canonical"},
    "ct-canonical": {"family": "compressed-tensors", "layout": "canonical"},
    "bf16-fused": {"family": "bf16", "layout": "fused"},
}
LEGACY = ["modelopt-legacy", "modelopt-legacy-packed", "modelopt-split", "ct-legacy"]

#: gate/up global scales apart (ModelOpt's per-expert export does not unify them): harmonization
MISMATCHED: dict[str, dict[str, Any]] = {
    "modelopt-mismatch": {"family": "modelopt", "layout": "legacy", "up_mismatch": 1.3},
    "ct-mismatch": {"family": "compressed-tensors", "layout": "legacy", "up_mismatch": 1.3},
}


def _both_expert_counts(cfg: dict[str, Any]) -> None:
    cfg["text_config"]["num_experts"] = 8  # type: ignore[index]


#: configs as transformers 5 writes them (ModelOpt 0.47, llm-compressor 0.14: canonical names)
T5: dict[str, dict[str, Any]] = {
    "t5-modelopt": {"family": "modelopt", "layout": "canonical", "generation": "5"},
    "t5-ct": {"family": "compressed-tensors", "layout": "canonical", "generation": "5"},
    "t5-modelopt-legacy": {"family": "modelopt", "layout": "legacy", "generation": "5"},
    "t5-conflict": {"family": "modelopt", "layout": "canonical", "generation": "5", "config_edit": _both_expert_counts},
}

#: damaged copies of the legacy ModelOpt checkpoint -> (edit, exception the shim raises, tensor it names)
DAMAGED: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str, str]] = {
    "missing-scale": (
        _drop(f"{L}.0.mlp.experts.gate_proj.2.weight_scale_2"),
        "MissingTensorError",
        f"{L}.0.mlp.experts.gate_proj.2.weight_scale_2",
    ),
    "zero-input-scale": (
        _zero(f"{L}.1.mlp.experts.up_proj.1.input_scale"),
        "UnusableScaleError",
        f"{L}.1.mlp.experts.up_proj.1.input_scale",
    ),
    "out-of-range": (_extra_expert, "ExpertIndexError", f"{L}.0.mlp.experts.down_proj.4."),
    "duplicate": (_duplicate, "DuplicateTensorError", f"{L}.0.mlp.experts.1.up_proj.weight_scale"),
    "awq": (_awq, "UnsupportedTensorError", f"{L}.0.mlp.experts.gate_proj.0.pre_quant_scale"),
    "mixed-fused": (_fused, "MixedLayoutError", f"{L}.1.mlp.experts.gate_up_proj"),
}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    for name, kwargs in {**GOOD, **MISMATCHED, **T5}.items():
        checkpoints.write(root / name, **kwargs)
    for name, (edit, _, _) in DAMAGED.items():
        checkpoints.write(root / name, edit=edit)
    return root


@pytest.fixture(scope="session")
def paths(ckpt_dir: Path) -> Callable[..., list[Path]]:
    return lambda *names: [ckpt_dir / n for n in names]
