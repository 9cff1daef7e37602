"""The benchmark's checkpoints, written once (by the vLLM venv's python) and cached.

- ``census``: Qwen3-VL-30B-A3B's tensor census (48 layers x 128 experts x 3 projections x 4 tensors
  = 73,728 expert tensors) at tiny dimensions: the cost per tensor.  ``legacy/`` and ``canonical/``
  hold identical bytes under the two expert spellings; ``sharded/`` is legacy in 8 shards.
- ``real``: 2 MoE layers at 30B-A3B's real MoE dimensions (hidden 2048, 128 experts,
  moe_intermediate 768), gate/up global scales apart in every expert: the cost per byte, and
  the fold at its real size.
- ``convert``: ``real``'s 2 layers written 4 times over as layers 0-7, one shard each pair (a
  sharded real-size checkpoint big enough that copying, as for a real model, outweighs start-up).

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
EXPERT_TENSORS = {"census": 48 * 128 * 3 * 4, "real": 2 * 128 * 3 * 4, "convert": 8 * 128 * 3 * 4}
#: derived workloads: name -> (cache version, source workload, copies of its layers)
DERIVED = {"convert": ("v1", "real", 4)}


def cache_dir(name: str) -> Path:
    env = os.environ.get("VLLM_MODELOPT_SHIM_BENCH")
    base = Path(env) if env else Path.home() / ".cache" / "vllm-modelopt-shim" / "bench"
    return base / f"{name}-{(DERIVED.get(name) or WORKLOADS[name])[0]}"


def write(name: str, directory: Path) -> dict[str, Any]:
    """Write workload ``name`` into ``directory`` (the driver renames it into the cache); its manifest."""
    if name in DERIVED:
        return _replicate(name, directory)
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


def _replicate(name: str, directory: Path) -> dict[str, Any]:
    """``copies`` times the source workload's MoE layers, renumbered, one shard per copy (legacy names)."""
    from safetensors.torch import load_file, save_file

    _, source, copies = DERIVED[name]
    src = cache_dir(source) / "legacy"
    tensors = load_file(str(src / "model.safetensors"))
    layers = 1 + max(int(n.split(".layers.")[1].split(".")[0]) for n in tensors if ".language_model.layers." in n)
    out = directory / "legacy"
    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers * copies
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(src / "hf_quant_config.json", out / "hf_quant_config.json")
    weight_map: dict[str, str] = {}
    total = experts = 0
    for copy in range(copies):
        part = {}
        for n, t in tensors.items():
            if ".language_model.layers." in n:
                head, rest = n.split(".layers.", 1)
                index, tail = rest.split(".", 1)
                part[f"{head}.layers.{int(index) + copy * layers}.{tail}"] = t
            elif copy == 0:
                part[n] = t
        fname = f"model-{copy + 1:05d}-of-{copies:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
        experts += sum(".mlp.experts." in n for n in part)
    if experts != EXPERT_TENSORS[name]:
        raise RuntimeError(f"{experts} expert tensors, expected {EXPERT_TENSORS[name]}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    final = cache_dir(name)
    manifest = {"name": name, "dir": str(final), "legacy": str(final / "legacy"), "source": source,
                "copies": copies, "tensors": len(weight_map), "expert_tensors": experts, "bytes": total}  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
