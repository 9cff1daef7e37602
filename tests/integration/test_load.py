"""Real vLLM (the venv's release) loads the tiny checkpoints on CPU: the bug, the fix, the refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

from integration.conftest import DAMAGED, GOOD, LEGACY

pytestmark = pytest.mark.vllm

Paths = Callable[..., list[Path]]


@pytest.fixture(scope="module")
def on(paths: Paths) -> dict[str, dict[str, Any]]:
    """The shim armed by PYTHONPATH, byte-exact mode (harmonization off)."""
    return vllm_runs.run(paths(*GOOD, *DAMAGED), VLLM_MODELOPT_SHIM_HARMONIZE="0")


@pytest.fixture(scope="module")
def off(paths: Paths) -> dict[str, dict[str, Any]]:
    """The checkout on PYTHONPATH but the toggle off: must behave exactly as stock vLLM."""
    return vllm_runs.run(paths(*GOOD), VLLM_MODELOPT_SHIM="0")


def upstream_error(name: str = "modelopt-legacy") -> tuple[str, str]:
    """What stock vLLM raises on the legacy layout (facts.md section 1; measured per release)."""
    release = vllm_runs.vllm_release()
    if release < (0, 24, 0) and name == "modelopt-split":  # gate/up first: 0.17 looks them up by name
        return "KeyError", "experts.gate_proj.0.weight"
    if release < (0, 25, 0):  # 0.24 skips gate/up silently, then crashes on the first down_proj
        return "IndexError", "Dimension out of range"
    return "AttributeError", "has no parameter 'w2_weight.0."


def assert_byte_exact(r: dict[str, Any]) -> None:
    assert r.get("stage") == "loaded", r.get("tb", r)
    assert r["patched"] is True
    assert r["checked"] == 64, r  # 2 layers x 4 experts x (w13, w2) x 4 suffixes
    assert r["mismatched"] == [] and r["unmatched"] == []
    assert r["unwritten"] == [], r["unwritten"]


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_checkpoints_load_byte_exact_with_the_shim(on: dict[str, Any], name: str) -> None:
    assert_byte_exact(on[name])


@pytest.mark.parametrize(
    ("legacy", "canonical"), [("modelopt-legacy", "modelopt-canonical"), ("ct-legacy", "ct-canonical")]
)
def test_legacy_with_the_shim_equals_stock_vllm_on_canonical_names(
    on: dict[str, Any], off: dict[str, Any], legacy: str, canonical: str
) -> None:
    assert off[canonical]["stage"] == "loaded"
    assert on[legacy]["digest"] == off[canonical]["digest"]  # every parameter, byte for byte


def test_the_bug_report_spelling_weight_packed_loads_like_weight(on: dict[str, Any]) -> None:
    assert on["modelopt-legacy-packed"]["digest"] == on["modelopt-legacy"]["digest"]


@pytest.mark.parametrize("name", ["modelopt-canonical", "ct-canonical", "bf16-fused"])
def test_checkpoints_that_stock_vllm_loads_are_loaded_identically(
    on: dict[str, Any], off: dict[str, Any], name: str
) -> None:
    assert on[name]["stage"] == off[name]["stage"] == "loaded"
    assert on[name]["digest"] == off[name]["digest"]
    assert on[name]["unwritten"] == []


@pytest.mark.parametrize("name", LEGACY)
def test_without_the_shim_legacy_checkpoints_fail_as_upstream(off: dict[str, Any], name: str) -> None:
    r = off[name]
    kind, text = upstream_error(name)
    assert r["stage"] == "load" and r["error"] == kind and text in r["message"], r
    assert r["patched"] is False


def test_without_the_shim_gate_up_before_down_are_silently_never_written(off: dict[str, Any]) -> None:
    """The worst outcome: vLLM skips gate/up without a word; only the first down_proj tensor crashes."""
    if vllm_runs.vllm_release() < (0, 24, 0):
        pytest.skip("0.17-0.23 route gate/up through their own loop (measured in the matrix)")
    r = off["modelopt-split"]
    w13 = [p for p in r["unwritten"] if ".w13_" in p]
    assert any("layers.0.mlp.experts" in p and "w13_weight[" in p for p in w13), r["unwritten"]


def test_stock_vllm_without_the_checkout_fails_the_same_way(paths: Paths) -> None:
    r = vllm_runs.run(paths("modelopt-legacy"), shim=False)["modelopt-legacy"]
    kind, text = upstream_error()
    assert r["error"] == kind and text in r["message"]


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_checkpoints_are_refused_naming_the_tensor(on: dict[str, Any], name: str) -> None:
    _, error, tensor = DAMAGED[name]
    r = on[name]
    assert r["stage"] == "load" and r["error"] == error, r
    assert tensor in r["message"]


@pytest.mark.parametrize("name", ["modelopt-legacy", "modelopt-split", "ct-legacy"])
def test_every_scale_value_is_checked_as_the_checkpoint_holds_it(on: dict[str, Any], name: str) -> None:
    """Every per-expert global and input scale is read from its own tensor, in every layer."""
    from safetensors import safe_open

    suffixes = ("weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale")
    expected: dict[str, float] = {}
    for shard in Path(on[name]["ckpt"]).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if ".experts." in k and k.endswith(suffixes):
                    expected[k] = f.get_tensor(k).item()
    scales = on[name]["scales"]
    assert len(expected) == 2 * 4 * 3 * 2 and scales["values"] == expected


def test_one_summary_line_per_load(on: dict[str, Any]) -> None:
    lines = on["modelopt-legacy"]["shim_log"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "INFO vllm-modelopt-shim: 180 tensors seen, 96 renamed, 8 experts verified in 2 MoE layers"
    )
    assert "s in the shim" in lines[0]
    assert "[patch.py" in on["modelopt-legacy"]["log"]  # printed through vLLM's own log format


def test_warn_mode_loads_and_logs_instead_of_refusing(paths: Paths) -> None:
    runs = vllm_runs.run(
        paths("zero-input-scale", "duplicate"), VLLM_MODELOPT_SHIM_VERIFY="warn", VLLM_MODELOPT_SHIM_HARMONIZE="0"
    )
    zero, dup = runs["zero-input-scale"], runs["duplicate"]
    assert zero["stage"] == "loaded" and dup["stage"] == "loaded"
    assert any("WARNING" in x and "layers.1.mlp.experts.up_proj.1.input_scale = 0.0" in x for x in zero["shim_log"])
    assert any("VLLM_MODELOPT_SHIM_VERIFY=warn" in x for x in dup["shim_log"])
    assert any("1 refused" in x for x in dup["shim_log"])


def test_the_report_lists_every_layer_and_everything_not_loaded(paths: Paths, tmp_path: Path) -> None:
    import json

    report_dir = tmp_path / "reports"
    vllm_runs.run(
        paths("modelopt-legacy", "duplicate"),
        VLLM_MODELOPT_SHIM_VERIFY="warn",
        VLLM_MODELOPT_SHIM_HARMONIZE="0",
        VLLM_MODELOPT_SHIM_REPORT=str(report_dir),
    )
    (report,) = report_dir.glob("vllm-modelopt-shim-*.json")  # one file per process: host, pid, token
    data = json.loads(report.read_text())
    assert report.name.startswith("vllm-modelopt-shim-") and f"-{data['pid']}-" in report.name
    assert len(data["loads"]) == 2
    good, dup = data["loads"]
    assert good["tensors_seen"] == 180 and good["renamed"] == 96 and good["not_loaded"] == []
    assert set(good["layers"]) == {f"model.language_model.layers.{i}.mlp.experts" for i in (0, 1)}
    assert all(v == {"tensors_seen": 48, "renamed": 48, "experts_verified": 4} for v in good["layers"].values())
    (refused,) = dup["not_loaded"]
    assert refused["tensor"].endswith("experts.up_proj.1.weight_scale") and "second copy" in refused["reason"]
