"""The benchmark's measurements, each in a fresh interpreter of the vLLM venv (bench/run.py starts them).

    python bench/worker.py write NAME DIR     # a workload (bench/workloads.py) into DIR
    python bench/worker.py load CKPT          # build the model untimed, time loader.load_weights alone
    python bench/worker.py fold CKPT          # fold one real-size MoE layer's gate/up scales, as the stream does
    python bench/worker.py stream CKPT        # the shim's stream alone: layers in order, interleaved, reversed

Each prints one line ``BENCH-RESULT {json}``.  PYTHONPATH alone decides whether the shim is armed.
"""

from __future__ import annotations

import gc
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


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _warm(ckpt: str) -> None:
    """Read the checkpoint's shards once, untimed, so the timed load finds them in the page cache.

    This host's page cache does not keep them reliably: a real-size checkpoint was seen with no page
    resident minutes after a load, and reading it back took 0.4 s, which a load would spend waiting.
    The loads compare the shim's work with vLLM's, not disk reads.
    """
    buffer = bytearray(1 << 20)  # one small buffer: a large read would set the process's peak RSS itself
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _children() -> int:
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


def _settle(timeout: float = 30.0) -> None:
    """Wait until the processes this interpreter started have exited (at most ``timeout`` seconds: a child
    that stays would cost every load that much, never a hang).

    vLLM 0.32's import of humming starts two Python processes that build its kernel launchers in the
    background and exit seconds later.  On a 2-core machine they held a core through the first seconds
    of the timed load: a real-size load's loading thread waited 0.4-0.9 s runnable on the run queue, in
    shim and stock loads alike but never by the same amount.
    """
    started = time.perf_counter()
    while _children() and time.perf_counter() - started < timeout:
        time.sleep(0.05)


def _queued_s() -> float:
    """Seconds this thread has waited runnable on the run queue (Linux schedstat; 0 elsewhere)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def load(ckpt: str) -> dict[str, Any]:
    sys.path.insert(0, str(workloads.TESTS))  # the harness, not the checkout: PYTHONPATH decides the shim
    import harness
    import torch
    from vllm.config import set_current_vllm_config

    model, loader, vllm_config = harness.build(ckpt)
    patch = sys.modules.get("vllm_modelopt_shim.patch")
    shim = patch is not None and patch.is_applied()
    collections = [0, 0, 0]  # Python's collections while loading, by generation
    gc_clock = {"started": 0.0, "seconds": 0.0}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_clock["started"] = time.perf_counter()
        else:
            gc_clock["seconds"] += time.perf_counter() - gc_clock["started"]
            collections[info["generation"]] += 1

    _settle()
    _warm(ckpt)
    gc.callbacks.append(on_gc)
    try:
        with set_current_vllm_config(vllm_config):
            started, cpu, queued = time.perf_counter(), time.process_time(), _queued_s()
            loader.load_weights(model, vllm_config.model_config)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            queued = _queued_s() - queued
    finally:
        gc.callbacks.remove(on_gc)
    result: dict[str, Any] = {
        "ckpt": ckpt,
        "shim": shim,
        "load_s": elapsed,
        "load_cpu_s": cpu,
        "queued_s": queued,  # the loading thread runnable but not running: other work on the machine
        "maxrss_mib": _peak_mib(),
        "gc_collections": collections,
        "gc_s": gc_clock["seconds"],
        # bench/passthrough's stand-in wraps load_weights (bench/ladder.py checks it did)
        "passthrough": bool(getattr(type(model).load_weights, "bench_passthrough", False)),
        "vllm": version("vllm"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if shim:
        ledger = patch.last_ledger()  # type: ignore[union-attr]
        result.update(shim_s=ledger.seconds, seen=ledger.seen, renamed=ledger.renamed, refused=len(ledger.refused))
    return result


def _tensors(ckpt: str) -> list[tuple[str, Any]]:
    from safetensors import safe_open

    out = []
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out += [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118
    return out


def fold(ckpt: str, runs: int = 5) -> dict[str, Any]:
    """Seconds for the stream's Folder to take one real-size MoE layer's gate/up scales (all 128 experts,
    scales apart in each) in checkpoint order and hand them back folded; and its extra peak RSS."""
    import torch

    from vllm_modelopt_shim.harmonize import Folder
    from vllm_modelopt_shim.names import parse

    layer = "model.language_model.layers.0.mlp.experts"
    kinds = {"weight_scale": "block", "weight_scale_2": "global"}
    pieces = []
    for name, t in _tensors(ckpt):
        p = parse(name)
        if name.startswith(layer + ".") and p is not None and p.proj != "down_proj" and p.suffix in kinds:
            value = float(t.item()) if kinds[p.suffix] == "global" else None
            pieces.append((p.prefix, p.expert, p.proj, kinds[p.suffix], name, t, value))
    before = _peak_mib()
    seconds, folder = [], None
    for _ in range(runs):
        folder = Folder(reciprocal=False, num_experts=128)
        started = time.perf_counter()
        for piece in pieces:
            for _ in folder.take(*piece):  # the Folder hands a folded batch over lazily: take it all
                pass
        for _ in folder.drop():
            pass
        seconds.append(time.perf_counter() - started)
    assert folder is not None
    return {
        "experts": folder.result.experts,
        "changed": folder.result.harmonized,
        "pieces": len(pieces),
        "seconds": [round(s, 4) for s in seconds],
        "median_s": statistics.median(seconds),
        "extra_peak_mib": _peak_mib() - before,
        "threads": torch.get_num_threads(),
    }


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def stream(ckpt: str, reps: int = 9) -> dict[str, Any]:
    """The shim's stream over the census tensors (held in memory), default settings, three orders.

    Each rep runs all three, the order rotating, and the ratios are paired within a rep: runs of one
    order vary widely in one process here, and ratios of medians over a few reps disagreed run to run."""
    import torch

    from vllm_modelopt_shim.harmonize import Folder
    from vllm_modelopt_shim.ledger import Ledger
    from vllm_modelopt_shim.names import MODELOPT
    from vllm_modelopt_shim.stream import rewrite

    ts = _tensors(ckpt)
    by_layer: dict[str, list[tuple[str, Any]]] = {}
    for name, t in ts:
        key = name.split(".mlp.")[0] if ".layers." in name else ""
        by_layer.setdefault(key, []).append((name, t))
    groups = list(by_layer.values())
    interleaved = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    orders = {"ordered": ts, "interleaved": interleaved, "reversed": ts[::-1]}
    seconds: dict[str, list[float]] = {k: [] for k in orders}
    harmonized: dict[str, int] = {}
    keys = list(orders)
    for rep in range(reps):
        for key in keys[rep % 3 :] + keys[: rep % 3]:
            order = orders[key]
            ledger, folder = Ledger(MODELOPT, 128), Folder(reciprocal=False, num_experts=128)
            started = time.perf_counter()
            for _name, _t in rewrite(order, ledger, scalar=torch.Tensor.item, fold=folder, final=True):
                pass
            seconds[key].append(time.perf_counter() - started)
            harmonized[key] = folder.result.harmonized
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "tensors": len(ts),
        "seconds": {k: [round(s, 4) for s in v] for k, v in seconds.items()},
        "median_s": med,
        "harmonized": harmonized,
        "interleaved_ratio": _paired(seconds["interleaved"], seconds["ordered"]),
        "reversed_ratio": _paired(seconds["reversed"], seconds["ordered"]),
    }


def main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "write":
        result = workloads.write(rest[0], Path(rest[1]))
    elif kind in ("load", "fold", "stream"):
        result = {"load": load, "fold": fold, "stream": stream}[kind](rest[0])
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
