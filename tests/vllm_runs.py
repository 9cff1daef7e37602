"""Run tests/harness.py in fresh interpreters of the current vLLM venv; parse its JSON lines.

Each distinct environment is one subprocess that loads many checkpoints (a vLLM process costs
10-40 s to start; a checkpoint ~1 s), memoised for the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    _record(shim, overrides, results)
    return results


def results_file() -> Path:
    """Where this release's outcomes are kept for scripts/support_table.py (outside the checkout)."""
    from importlib.metadata import version

    root = Path(os.environ.get("VLLM_MODELOPT_SHIM_RESULTS", Path.home() / ".cache" / "vllm-modelopt-shim" / "results"))
    return root / f"vllm-{version('vllm')}.json"


def _record(shim: bool, overrides: dict[str, str], results: dict[str, dict[str, Any]]) -> None:
    if any(k.startswith("HARNESS_") for k in overrides):
        return  # call patterns and injected faults are not what the support table shows
    setting = "stock" if not shim or overrides.get("VLLM_MODELOPT_SHIM") == "0" else "shim"
    if overrides.get("VLLM_MODELOPT_SHIM_VERIFY") or (
        setting == "shim" and overrides.get("VLLM_MODELOPT_SHIM_HARMONIZE") != "0"
    ):
        return  # the table shows the default verification and byte-exact loads
    path = results_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    for name, r in results.items():
        ok = r.get("stage") == "loaded" and not r.get("mismatched") and not r.get("unwritten")
        data[f"{setting}:{name}"] = {
            "ok": ok,
            "error": None if ok else f"{r.get('error', 'parameters left unwritten')}: {str(r.get('message', ''))[:90]}",
            "when": time.strftime("%Y-%m-%d"),
        }
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def vllm_release() -> tuple[int, int, int]:
    from importlib.metadata import version

    parts = version("vllm").split("+")[0].split(".")
    return (int(parts[0]), int(parts[1]), int("".join(c for c in parts[2] if c.isdigit()) or 0))
