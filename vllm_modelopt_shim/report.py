"""VLLM_MODELOPT_SHIM_REPORT=DIR: one JSON file per process (named by pid), one entry per load."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .ledger import Ledger

__all__ = ["entry", "write"]


def entry(ledger: Ledger, problems: list[CheckpointError], harmonized: object | None) -> dict[str, Any]:
    """What one load saw, per MoE layer, and everything it did not load with the reason."""
    full, experts = ledger.full_mask(), ledger.expected_experts()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "family": ledger.family,
        "num_experts": ledger.num_experts,
        "tensors_seen": ledger.seen,
        "renamed": ledger.renamed,
        "layouts": dict(ledger.layouts),
        "layers": {
            prefix: {
                "tensors_seen": layer.seen,
                "renamed": layer.renamed,
                "experts_verified": layer.complete(full, experts),
            }
            for prefix, layer in ledger.layers.items()
        },
        "not_loaded": [{"tensor": name, "reason": reason} for name, reason in ledger.refused],
        "problems": [{"tensor": p.name, "error": type(p).__name__, "message": str(p)} for p in problems],
        "harmonized": str(harmonized) if harmonized is not None else None,
        "seconds_in_shim": round(ledger.seconds, 6),
        # scale slots whose values were read from vLLM's parameters once loaded (after the first MoE
        # layer proved them equal); every other scale value was read from its checkpoint tensor
        "scale_values_from_vllm": sorted(f"{proj}.{suffix}" for proj, suffix in ledger.handed),
    }


def write(directory: str, ledger: Ledger, problems: list[CheckpointError], harmonized: object | None) -> Path:
    """Append this load to DIR/vllm-modelopt-shim-<pid>.json (created with DIR if missing)."""
    path = Path(directory) / f"vllm-modelopt-shim-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"pid": os.getpid(), "loads": []}
    if path.is_file():
        data = json.loads(path.read_text())
    data["loads"].append(entry(ledger, problems, harmonized))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
