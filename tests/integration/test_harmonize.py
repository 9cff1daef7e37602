"""Real vLLM: after the fold, what vLLM computes for gate and up matches the checkpoint (issue targets)."""

from __future__ import annotations

import re
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
def test_one_line_says_how_many_experts_and_the_worst_error(
    harmonized: dict[str, Any], exact: dict[str, Any], name: str
) -> None:
    """The INFO line's figures are the load's: experts whose gate/up global scales differ in the checkpoint,
    up's error as a byte-exact load leaves it, and the error left after the fold (both measured here)."""
    r = harmonized[name]
    lines = [x for x in r["shim_log"] if "harmonized gate/up global scales" in x]
    assert len(lines) == 1, r["shim_log"]
    m = re.search(r"of (\d+) of (\d+) experts: worst relative error ([\d.]+)% -> ([\d.]+)%", lines[0])
    assert m is not None, lines[0]
    changed, experts, before, after = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    values = r["scales"]["values"]
    glob = "weight_global_scale" if name.startswith("ct") else "weight_scale_2"
    apart = sum(
        values[n] != values[n.replace(".gate_proj.", ".up_proj.")]
        for n in values
        if ".gate_proj." in n and n.endswith("." + glob)
    )
    assert experts == 8 and changed == apart > 0
    assert before == pytest.approx(100 * exact[name]["dequant"]["up"], abs=0.06)
    measured = 100 * max(r["dequant"]["gate"], r["dequant"]["up"])
    assert 0.0 < after <= 4.0 and after == pytest.approx(measured, rel=0.5), (after, measured)
