"""The patch's guards that need no vLLM: which releases count as tested."""

from __future__ import annotations

import pytest

from vllm_modelopt_shim.patch import untested


@pytest.mark.parametrize(
    "version", ["0.17.1", "0.24.0", "0.32.0", "0.33.0", "0.34.0", "0.34.3", "0.32.0+cpu", "0.20.1rc1"]
)
def test_tested_releases_do_not_warn(version: str) -> None:
    assert not untested(version)


@pytest.mark.parametrize("version", ["0.17.0", "0.11.2", "0.35.0", "1.0.0", "0.35.0.dev12+g1234"])
def test_releases_outside_the_matrix_warn(version: str) -> None:
    assert untested(version)


def test_release_parsing() -> None:
    from vllm_modelopt_shim.patch import _release

    assert _release("0.20.1rc1") == (0, 20, 1) and _release("0.32.0+cpu") == (0, 32, 0) and _release("dev") is None


def test_an_unreadable_version_is_not_flagged() -> None:
    assert not untested("unknown")
