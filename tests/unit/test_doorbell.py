"""The doorbell's committed bytecode: checked-hash, so it is used only while it matches the source."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYC = ROOT / "__pycache__" / "sitecustomize.cpython-311.pyc"
REGENERATE = "python3.11 -m compileall --invalidation-mode checked-hash sitecustomize.py"


def test_committed_bytecode_is_checked_hash_and_matches_the_source() -> None:
    data = PYC.read_bytes()
    flags = int.from_bytes(data[4:8], "little")
    assert flags == 0b11, f"not a checked-hash pyc: {REGENERATE}"
    source = (ROOT / "sitecustomize.py").read_bytes()
    assert data[8:16] == importlib.util.source_hash(source), f"stale doorbell bytecode: {REGENERATE}"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed bytecode is CPython 3.11's")
def test_committed_bytecode_is_for_this_interpreter() -> None:
    assert PYC.read_bytes()[:4] == importlib.util.MAGIC_NUMBER


@pytest.mark.parametrize("value", ["", "1", "on", " TRUE ", "yes", "0", "off", " False", "NO", "2", "disabled"])
def test_the_doorbell_and_settings_agree_on_off(value: str) -> None:
    """The doorbell (stdlib only) arms its hook exactly when settings.flag calls the shim on."""
    import os
    import subprocess

    from vllm_modelopt_shim import settings

    probe = "import sys; print(any(getattr(f, 'vllm_modelopt_shim', False) for f in sys.meta_path))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_MODELOPT_SHIM": value}
    armed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert armed.stdout.strip() == str(settings.flag({settings.ENABLE: value}, settings.ENABLE, warn=lambda _m: None))
