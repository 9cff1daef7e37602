"""Real vLLM: after the fold, what vLLM computes for gate and up matches the checkpoint (issue targets)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

from integration.conftest import MISMATCHED

pytestmark = pytest.mark.vllm

Paths = Callable[..., list[Path]]


@pytest.fixture(scope="module")
def harmonized(paths: Paths) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(paths(*MISMATCHED))  # the default: harmonization on


@pytest.fixture(scope="module")
def exact(paths: Paths) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(paths(*MISMATCHED), VLLM_MODELOPT_SHIM_HARMONIZE="0")


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_byte_exact_loading_leaves_up_proj_mis_scaled(exact: dict[str, Any], name: str) -> None:
    r = exact[name]
    assert r["stage"] == "loaded" and r["mismatched"] == [] and r["unwritten"] == []
    assert r["dequant"]["gate"] == 0.0
    assert r["dequant"]["up"] > 0.10, r["dequant"]  # vLLM uses gate's global scale for up


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_harmonized_gate_and_up_match_the_checkpoint(harmonized: dict[str, Any], name: str) -> None:
    r = harmonized[name]
    assert r["stage"] == "loaded" and r["unwritten"] == []
    assert r["dequant"]["gate"] <= 0.02 and r["dequant"]["up"] <= 0.04, r["dequant"]


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_one_line_says_how_many_experts_and_the_worst_error(harmonized: dict[str, Any], name: str) -> None:
    lines = [x for x in harmonized[name]["shim_log"] if "harmonized gate/up global scales" in x]
    assert len(lines) == 1 and "of 8 experts" in lines[0] and "->" in lines[0], harmonized[name]["shim_log"]
