"""VLLM_MODELOPT_SHIM_REPORT=DIR: one JSON file per process, one entry per full load.

The file name carries the host, the pid and a random token, so processes of containers that share
DIR never collide; each write replaces the file atomically with everything this process loaded.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .ledger import Ledger

__all__ = ["entry", "path", "write"]

_loads: list[dict[str, Any]] = []
_token = uuid.uuid4().hex[:8]


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
    }


def path(directory: str) -> Path:
    """This process's report file in ``directory``."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
    return Path(directory) / f"vllm-modelopt-shim-{host}-{os.getpid()}-{_token}.json"


def write(directory: str, ledger: Ledger, problems: list[CheckpointError], harmonized: object | None) -> Path:
    """Add this load to the process's report in DIR (created if missing); return the file."""
    target = path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _loads.append(entry(ledger, problems, harmonized))
    data = {"pid": os.getpid(), "host": socket.gethostname(), "loads": _loads}
    fd, tmp = tempfile.mkstemp(prefix=".vllm-modelopt-shim-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target
