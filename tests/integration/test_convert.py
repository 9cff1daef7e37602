"""convert SRC DST, then STOCK vLLM (no shim anywhere) loads DST: the same parameters the shim gives from SRC."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

from vllm_modelopt_shim.__main__ import main

pytestmark = pytest.mark.vllm

Paths = Callable[..., list[Path]]
CONVERT = ["modelopt-legacy", "ct-legacy", "modelopt-split", "t5-modelopt-legacy", "modelopt-mismatch", "ct-mismatch"]


def converted(paths: Paths, root: Path, *flags: str) -> list[Path]:
    out = []
    for src in paths(*CONVERT):
        dst = root / src.name  # the same name: results are keyed by it
        assert main(["convert", str(src), str(dst), *flags]) == 0
        out.append(dst)
    return out


@pytest.fixture(scope="module")
def default(paths: Paths, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(converted(paths, tmp_path_factory.mktemp("converted")), shim=False)


@pytest.fixture(scope="module")
def exact(paths: Paths, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return vllm_runs.run(converted(paths, tmp_path_factory.mktemp("exact"), "--no-harmonize"), shim=False)


@pytest.mark.parametrize("name", CONVERT)
def test_stock_vllm_loads_the_harmonized_copy_as_the_shim_loads_the_original(
    paths: Paths, default: dict[str, Any], name: str
) -> None:
    r = default[name]
    assert r["stage"] == "loaded" and r["patched"] is False, r.get("tb", r)
    assert r["unwritten"] == [] and r["mismatched"] == [] and r["checked"] == 64  # DST's own bytes, every one
    shim = vllm_runs.run(paths(*CONVERT))[name]  # the shim, default settings, on the original
    assert r["digest"] == shim["digest"]


@pytest.mark.parametrize("name", CONVERT)
def test_stock_vllm_loads_the_byte_exact_copy_as_the_shim_loads_the_original(
    paths: Paths, exact: dict[str, Any], name: str
) -> None:
    r = exact[name]
    assert r["stage"] == "loaded" and r["unwritten"] == [] and r["mismatched"] == [], r.get("tb", r)
    shim = vllm_runs.run(paths(*CONVERT), VLLM_MODELOPT_SHIM_HARMONIZE="0")[name]
    assert r["digest"] == shim["digest"]
