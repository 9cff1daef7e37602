"""The benchmark's checkpoints, written once by the vLLM venv's python and cached (bench/README.md).

- ``census``: Qwen3-VL-30B-A3B's tensor census (48 layers x 128 experts x 3 projections x 4 tensors
  = 73,728 expert tensors) at tiny dimensions: the shim's cost per tensor.  ``sharded/`` is the legacy
  copy in 8 shards, for ``doctor``.
- ``real``: 2 MoE layers at 30B-A3B's real MoE dimensions (hidden 2048, 128 experts,
  moe_intermediate 768), gate/up global scales apart in every odd expert: the cost per byte and the
  fold at its real size.
- ``real-awq``: ``real`` as an NVFP4_AWQ export (every expert's gate/up/down and each o_proj carry a
  ``pre_quant_scale``; outlier channels shared by a layer's experts): the AWQ folds' cost.

Each holds ``legacy/`` and ``canonical/``: the same bytes under the two expert spellings, so the shim
(legacy) and stock vLLM (canonical) load identical data.  Cached under $VLLM_MODELOPT_SHIM_BENCH or
~/.cache/vllm-modelopt-shim/bench/<name>-<version>/.
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
VERSION = "v1"  # bump when the recipe or tests/checkpoints.py's output changes

#: name -> (dimensions, up_mismatch: odd experts' up_proj scale over gate's, expert tensors)
WORKLOADS: dict[str, tuple[dict[str, Any], float, int]] = {
    "census": (
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
        48 * 128 * 3 * 4,
    ),
    "real": (
        {"layers": 2, "experts": 128, "hidden": 2048, "moe_intermediate": 768, "v_depth": 1, "deepstack": [0]},
        1.1,  # 10% apart: the fold shifts gate by a power of two
        2 * 128 * 3 * 4,
    ),
    "real-awq": (
        {"layers": 2, "experts": 128, "hidden": 2048, "moe_intermediate": 768, "v_depth": 1, "deepstack": [0]},
        1.1,
        2 * 128 * 3 * 5,  # and a pre_quant_scale each
    ),
}
#: the workloads written as NVFP4_AWQ exports
AWQ = frozenset({"real-awq"})


def cache_dir(name: str) -> Path:
    """Where workload ``name`` lives once written."""
    env = os.environ.get("VLLM_MODELOPT_SHIM_BENCH")
    base = Path(env) if env else Path.home() / ".cache" / "vllm-modelopt-shim" / "bench"
    return base / f"{name}-{VERSION}"


def write(name: str, directory: Path) -> dict[str, Any]:
    """Write workload ``name`` into ``directory`` (the driver renames it into the cache); its manifest."""
    sys.path.insert(0, str(TESTS))
    import checkpoints

    dims, mismatch, expected = WORKLOADS[name]
    captured: dict[str, dict[str, Any]] = {}
    for layout in ("legacy", "canonical"):
        checkpoints.write(
            directory / layout,
            layout=layout,
            seed=SEED,
            dims=dims,
            up_mismatch=mismatch,
            edit=lambda ts, layout=layout: captured.__setitem__(layout, dict(ts)),
            awq=checkpoints.Awq(outlier=10.0) if name in AWQ else None,
        )
    legacy = captured["legacy"]
    _check_same_bytes(legacy, captured["canonical"])
    experts = sum(".mlp.experts." in n for n in legacy)
    if experts != expected:
        raise RuntimeError(f"{experts} expert tensors, expected {expected}")
    final = cache_dir(name)
    manifest: dict[str, Any] = {
        "name": name,
        "legacy": str(final / "legacy"),
        "canonical": str(final / "canonical"),
        "tensors": len(legacy),
        "expert_tensors": experts,
    }
    if name == "census":
        _shard(legacy, directory / "legacy", directory / "sharded")
        manifest["sharded"] = str(final / "sharded")
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_same_bytes(legacy: dict[str, Any], canonical: dict[str, Any]) -> None:
    """Both layouts must hold identical bytes, or the paired loads would compare different work."""
    import torch

    for (a, ta), (b, tb) in zip(legacy.items(), canonical.items(), strict=True):
        if ta.shape != tb.shape or not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            raise RuntimeError(f"legacy {a} and canonical {b} differ")


def _shard(tensors: dict[str, Any], source: Path, out: Path) -> None:
    """``tensors`` in the exporter's order over SHARDS files with an index, as a real model ships."""
    from safetensors.torch import save_file

    out.mkdir()
    for f in ("config.json", "hf_quant_config.json"):
        shutil.copy(source / f, out / f)
    names = list(tensors)
    per = -(-len(names) // SHARDS)
    weight_map: dict[str, str] = {}
    for i in range(SHARDS):
        fname = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
