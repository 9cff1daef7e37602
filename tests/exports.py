"""Real ModelOpt 0.43 exports for the tests, made on CPU by scripts/modelopt_export.py and cached.

The export runs in its own venv (created on first use, ~1 minute; the export itself ~15 s) and is
deterministic for a seed, so the cache is keyed by the exporter's source: editing the script makes
a new export.  Kept under ~/.cache/vllm-modelopt-shim/exports (``VLLM_MODELOPT_SHIM_VENVS``'s sibling).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "modelopt_export.py"


def real(algo: str = "nvfp4_awq", seed: int = 0) -> Path:
    """The directory of a real export (``algo``: nvfp4 | nvfp4_awq); its bf16 original is ``<dir>-bf16``."""
    tag = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:10]
    root = Path(os.environ.get("VLLM_MODELOPT_SHIM_VENVS", Path.home() / ".cache" / "vllm-modelopt-shim" / "venvs"))
    dst = root.parent / "exports" / f"{algo}-seed{seed}-{tag}"
    if not (dst / "model.safetensors").is_file():
        for partial in (dst, Path(f"{dst}-bf16")):  # an interrupted export
            shutil.rmtree(partial, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(SCRIPT), str(dst), "--algo", algo, "--seed", str(seed), "--bf16", f"{dst}-bf16"],
            check=True,
            timeout=1800,
        )
    return dst
