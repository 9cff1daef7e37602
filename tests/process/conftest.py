"""Fixtures shared by the process tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pip_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install <checkout>` into a folder, once per run, as users do (pip's own build isolation: older
    vLLM venvs lack `wheel`), from a copy of the checkout so the build leaves no trace in it."""
    tmp = tmp_path_factory.mktemp("pip")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build"))
    target = tmp / "target"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return target
