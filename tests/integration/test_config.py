"""Real vLLM: configs written by transformers 5 load, and the model sees 4 experts, renormalized top-k, rope."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

from integration.conftest import T5

pytestmark = pytest.mark.vllm

Paths = Callable[..., list[Path]]
LOADABLE = ["t5-modelopt", "t5-ct", "t5-modelopt-legacy"]


@pytest.fixture(scope="module")
def on(paths: Paths) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(paths(*T5, "modelopt-legacy"), VLLM_MODELOPT_SHIM_HARMONIZE="0")


@pytest.fixture(scope="module")
def off(paths: Paths) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(paths(*LOADABLE), VLLM_MODELOPT_SHIM="0")


EXPECTED_MODEL = {"num_experts": 4, "renormalize": True, "rope_theta": 5000000, "mrope_section": [6, 5, 5]}


@pytest.mark.parametrize("name", LOADABLE)
def test_transformers_5_configs_load_byte_exact_with_the_right_model(on: dict[str, Any], name: str) -> None:
    r = on[name]
    assert r["stage"] == "loaded", r.get("tb", r)
    assert r["checked"] == 64 and r["mismatched"] == [] and r["unwritten"] == []
    assert {k: r["model"][k] for k in EXPECTED_MODEL} == EXPECTED_MODEL


def test_transformers_457_config_sees_the_same_model(on: dict[str, Any]) -> None:
    """The rope settings are read correctly from either spelling (kept as a regression test)."""
    assert {k: on["modelopt-legacy"]["model"][k] for k in EXPECTED_MODEL} == EXPECTED_MODEL


@pytest.mark.parametrize("name", LOADABLE)
def test_each_config_change_is_logged_once_naming_key_value_and_why(on: dict[str, Any], name: str) -> None:
    lines = [x for x in on[name]["shim_log"] if "config: set" in x]
    assert lines, on[name]["shim_log"]
    assert all("text_config." in x and "(" in x for x in lines)
    assert len(lines) == len(set(lines))


def test_a_config_spelling_one_setting_two_ways_is_refused(on: dict[str, Any]) -> None:
    r = on["t5-conflict"]
    assert r["stage"] == "build" and r["error"] == "ConfigConflictError", r
    assert "text_config.num_experts = 8" in r["message"] and "num_local_experts = 4" in r["message"]


@pytest.mark.parametrize("name", LOADABLE)
def test_without_the_shim_transformers_5_configs_fail_as_upstream(off: dict[str, Any], name: str) -> None:
    r = off[name]
    if vllm_runs.vllm_release() >= (0, 24, 0):
        assert r["stage"] == "build" and r["error"] == "AttributeError" and "norm_topk_prob" in r["message"], r
    else:  # transformers 4.57 reads num_experts as its default, 60, and loading dies
        assert r["stage"] == "load" and r["model"]["num_experts"] == 60, r
        if name == "t5-modelopt-legacy":  # the legacy layout's own IndexError comes first
            assert r["error"] == "IndexError" and "Dimension out of range" in r["message"], r
        else:
            assert r["error"] == "AssertionError" and "torch.Size([60, 256])" in r["message"], r
