"""The benchmark's measurements, each in a fresh interpreter of the vLLM venv (bench/run.py starts them).

    python bench/worker.py write NAME DIR   # workload NAME (bench/workloads.py) into DIR
    python bench/worker.py load CKPT        # build the model untimed, time loader.load_weights alone
    python bench/worker.py fold CKPT        # the Folder on one real-size MoE layer's gate/up scales

Each prints one line ``BENCH-RESULT {json}``.  PYTHONPATH alone decides whether the shim is armed.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import workloads  # noqa: E402

MARK = "BENCH-RESULT "


def peak_mib() -> float:
    """This process's peak RSS (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm(ckpt: str) -> None:
    """Read the checkpoint once, untimed: the loads compare the shim's work with vLLM's, not disk reads.

    One small buffer, so that the read does not set the process's peak RSS itself.
    """
    buffer = bytearray(1 << 20)
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def children() -> int:
    """Live processes whose parent is this one (Linux /proc; 0 elsewhere)."""
    me, n = str(os.getpid()), 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            n += fields[1] == me and fields[0] != "Z"
    return n


def settle(timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` s) until the processes vLLM's import started have exited.

    vLLM 0.32 imports humming, which builds kernel launchers in two background processes for a few
    seconds; on 2 cores they would hold a core through the timed load, never by the same amount.
    """
    started = time.perf_counter()
    while children() and time.perf_counter() - started < timeout:
        time.sleep(0.05)


def load(ckpt: str) -> dict[str, Any]:
    """Wall seconds and peak RSS of vLLM's load_weights, plus the shim's own clock when it is armed."""
    sys.path.insert(0, str(workloads.TESTS))  # the harness, not the checkout: PYTHONPATH decides the shim
    import harness
    from vllm.config import set_current_vllm_config

    model, loader, vllm_config = harness.build(ckpt)
    patch = sys.modules.get("vllm_modelopt_shim.patch")
    shim = patch is not None and patch.is_applied()
    settle()
    warm(ckpt)
    with set_current_vllm_config(vllm_config):
        started = time.perf_counter()
        loader.load_weights(model, vllm_config.model_config)
        elapsed = time.perf_counter() - started
    result: dict[str, Any] = {"shim": shim, "load_s": elapsed, "maxrss_mib": peak_mib(), "vllm": version("vllm")}
    if shim:
        ledger = patch.last_ledger()  # type: ignore[union-attr]
        result.update(own_s=ledger.seconds, seen=ledger.seen, renamed=ledger.renamed, refused=len(ledger.refused))
    return result


def gate_up_scales(ckpt: str, layer: str) -> list[tuple[Any, ...]]:
    """``layer``'s gate/up block and global scales as the stream hands them to the Folder, in file order."""
    from safetensors import safe_open

    from vllm_modelopt_shim.names import parse

    kinds = {"weight_scale": "block", "weight_scale_2": "global"}
    pieces = []
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                p = parse(name)
                if name.startswith(layer + ".") and p is not None and p.proj != "down_proj" and p.suffix in kinds:
                    t = f.get_tensor(name)
                    value = float(t.item()) if kinds[p.suffix] == "global" else None
                    pieces.append((p.prefix, p.expert, p.proj, kinds[p.suffix], name, t, value))
    return pieces


def fold(ckpt: str, runs: int = 5) -> dict[str, Any]:
    """Median seconds for the Folder to take one real-size layer's scales (128 experts) and hand them back."""
    from vllm_modelopt_shim.harmonize import Folder

    pieces = gate_up_scales(ckpt, "model.language_model.layers.0.mlp.experts")
    seconds = []
    for _ in range(runs):
        folder = Folder(reciprocal=False, num_experts=128)
        started = time.perf_counter()
        for piece in pieces:
            for _ in folder.take(*piece):
                pass
        for _ in folder.drop():
            pass
        seconds.append(time.perf_counter() - started)
    return {
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "pieces": len(pieces),
        "experts": folder.result.experts,
        "harmonized": folder.result.harmonized,
    }


def main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "write":
        result = workloads.write(rest[0], Path(rest[1]))
    elif kind == "load":
        result = load(rest[0])
    elif kind == "fold":
        result = fold(rest[0])
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
