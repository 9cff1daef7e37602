"""scripts/venv.py reads pip's failure to find which pin the package index lacks (no version keyed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("venv_script", ROOT / "scripts" / "venv.py")
assert _spec is not None and _spec.loader is not None
venv_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(venv_script)

# pip 23-25's words when `pip install vllm==0.34.0` meets this index (measured 2026-12-07)
PIP_ERROR = (
    "ERROR: Could not find a version that satisfies the requirement flashinfer-python==0.7.3 (from vllm) "
    "(from versions: 0.7.2, 0.7.2.post1, 0.7.4)\n"
    "ERROR: No matching distribution found for flashinfer-python==0.7.3\n"
)


def test_the_missing_pin_is_read_from_pips_error() -> None:
    assert venv_script._MISSING.findall(PIP_ERROR) == [("flashinfer-python", "0.7.3")]


def test_names_compare_as_pip_normalises_them() -> None:
    assert venv_script._canonical("Flashinfer_Python") == venv_script._canonical("flashinfer-python")
    assert venv_script._canonical("nvidia.cudnn_frontend") == "nvidia-cudnn-frontend"


def test_a_missing_vllm_is_not_a_pin_to_drop() -> None:
    import pytest

    err = "ERROR: No matching distribution found for vllm==9.9.9\n"
    with pytest.raises(RuntimeError, match=r"could not install vLLM 9\.9\.9"):
        venv_script._install_without_missing_pins("python", {}, True, "9.9.9", 0.0, err)
