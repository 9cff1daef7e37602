"""Run tests/harness.py in fresh interpreters of the current vLLM venv; parse its JSON lines.

Each distinct environment is one subprocess that loads many checkpoints (a vLLM process costs
10-40 s to start; a checkpoint ~1 s), memoised for the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "harness.py"
_cache: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}


def clean_env(shim: bool = True, **overrides: str) -> dict[str, str]:
    """os.environ without any shim variable, with the checkout on PYTHONPATH when ``shim``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODELOPT_SHIM") and k != "PYTHONPATH"}
    if shim:
        env["PYTHONPATH"] = str(ROOT)
    env.update(overrides)
    return env


def run(ckpts: list[Path], shim: bool = True, timeout: float = 900, **overrides: str) -> dict[str, dict[str, Any]]:
    """checkpoint dir name -> harness result, loading all of ``ckpts`` in one process."""
    key = (tuple(map(str, ckpts)), shim, tuple(sorted(overrides.items())))
    if key in _cache:
        return _cache[key]
    proc = subprocess.run(
        [sys.executable, str(HARNESS), *map(str, ckpts)],
        env=clean_env(shim, **overrides),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ckpts[0].parent),
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("HARNESS "):
            r = json.loads(line[len("HARNESS ") :])
            r["log"] = proc.stdout + proc.stderr
            results[Path(r["ckpt"]).name] = r
    if len(results) != len(ckpts):
        raise AssertionError(f"harness exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    _cache[key] = results
    return results


def vllm_release() -> tuple[int, int, int]:
    from importlib.metadata import version

    parts = version("vllm").split("+")[0].split(".")
    return (int(parts[0]), int(parts[1]), int("".join(c for c in parts[2] if c.isdigit()) or 0))
