"""The benchmark's checkpoints, written once (by the vLLM venv's python) and cached.

- ``census``: Qwen3-VL-30B-A3B's tensor census (48 layers x 128 experts x 3 projections x 4 tensors
  = 73,728 expert tensors) at tiny dimensions: the cost per tensor.  ``legacy/`` and ``canonical/``
  hold identical bytes under the two expert spellings; ``sharded/`` is legacy in 8 shards.
- ``real``: 2 MoE layers at 30B-A3B's real MoE dimensions (hidden 2048, 128 experts,
  moe_intermediate 768), gate/up global scales apart in every expert: the cost per byte, and
  the fold at its real size.

Cached under $VLLM_MODELOPT_SHIM_BENCH or ~/.cache/vllm-modelopt-shim/bench/<name>-<version>/.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SEED = 0
SHARDS = 8

#: name -> (cache version: bump when the recipe or tests/checkpoints.py's output changes, dimensions, up_mismatch)
WORKLOADS: dict[str, tuple[str, dict[str, Any], float]] = {
    "census": (
        "v1",
        {
            "layers": 48,
            "experts": 128,
            "hidden": 64,
            "moe_intermediate": 32,
            "head_dim": 32,
            "v_depth": 1,
            "deepstack": [0],
        },
        1.0,
    ),
    "real": (
        "v1",
        {"layers": 2, "experts": 128, "hidden": 2048, "moe_intermediate": 768, "v_depth": 1, "deepstack": [0]},
        1.1,  # odd experts' up_proj 10% larger: their fold shifts gate by a power of two
    ),
}
EXPERT_TENSORS = {"census": 48 * 128 * 3 * 4, "real": 2 * 128 * 3 * 4}


def cache_dir(name: str) -> Path:
    env = os.environ.get("VLLM_MODELOPT_SHIM_BENCH")
    base = Path(env) if env else Path.home() / ".cache" / "vllm-modelopt-shim" / "bench"
    return base / f"{name}-{WORKLOADS[name][0]}"


def write(name: str, directory: Path) -> dict[str, Any]:
    """Write workload ``name`` into ``directory`` (the driver renames it into the cache); its manifest."""
    sys.path.insert(0, str(TESTS))
    import checkpoints
    import torch
    from safetensors.torch import save_file

    _, dims, mismatch = WORKLOADS[name]
    captured: dict[str, dict[str, Any]] = {}
    for layout in ("legacy", "canonical"):
        checkpoints.write(
            directory / layout,
            layout=layout,
            seed=SEED,
            dims=dims,
            up_mismatch=mismatch,
            edit=lambda ts, layout=layout: captured.__setitem__(layout, dict(ts)),
        )
    legacy, canonical = captured["legacy"], captured["canonical"]
    for (a, ta), (b, tb) in zip(legacy.items(), canonical.items(), strict=True):  # same bytes, other names
        if ta.shape != tb.shape or not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            raise RuntimeError(f"legacy {a} and canonical {b} differ")
    experts = sum(".mlp.experts." in n for n in legacy)
    if experts != EXPERT_TENSORS[name]:
        raise RuntimeError(f"{experts} expert tensors, expected {EXPERT_TENSORS[name]}")
    total = sum(t.numel() * t.element_size() for t in legacy.values())
    final = cache_dir(name)
    manifest: dict[str, Any] = {
        "name": name,
        "dir": str(final),
        "legacy": str(final / "legacy"),
        "canonical": str(final / "canonical"),
        "dims": dims,
        "seed": SEED,
        "tensors": len(legacy),
        "expert_tensors": experts,
        "bytes": total,
    }
    if name == "census":
        sharded = directory / "sharded"
        sharded.mkdir()
        for f in ("config.json", "hf_quant_config.json"):
            shutil.copy(directory / "legacy" / f, sharded / f)
        names = list(legacy)  # the exporter's order: layer by layer
        per = -(-len(names) // SHARDS)
        weight_map: dict[str, str] = {}
        for i in range(SHARDS):
            fname = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
            part = {n: legacy[n].contiguous() for n in names[i * per : (i + 1) * per]}
            save_file(part, str(sharded / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (sharded / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        manifest.update(sharded=str(final / "sharded"), shards=SHARDS)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
