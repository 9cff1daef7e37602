"""vLLM's own EP weight filter on legacy names (vLLM 0.24+): the rank skips other experts' weights.

A fresh interpreter of this venv's vLLM imports qwen3_vl_moe (the doorbell arms the patch, which
teaches ``ep_weight_filter.parse_expert_id`` the legacy spelling), then runs vLLM's own
``safetensors_weights_iterator`` over a ModelOpt legacy export as an EP rank holding experts {0, 1}
of 4: it must read the weight tensors of experts 0 and 1 only, and every scale (vLLM keeps those).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import vllm_runs

pytestmark = pytest.mark.vllm
pytest.importorskip("torch", reason="integration tests run inside a vLLM venv: python3 scripts/test.py")

ITERATE = textwrap.dedent(
    """
    import glob, json, sys
    try:
        from vllm.model_executor.model_loader import ep_weight_filter  # noqa: F401
    except ImportError:
        print("FILTER none"); sys.exit(0)
    import vllm.model_executor.models.qwen3_vl_moe  # noqa: F401  (the doorbell patches here)
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    files = sorted(glob.glob(sys.argv[1] + "/*.safetensors"))
    names = [n for n, _ in safetensors_weights_iterator(files, False, local_expert_ids={0, 1})]
    print("FILTER " + json.dumps(names))
    """
)
EXPERT = re.compile(r"\.experts\.(?:(?:gate_proj|up_proj|down_proj)\.(\d+)|(\d+)\.\w+)\.(\w+)$")


def iterate(ckpt: Path, **env: str) -> list[str] | None:
    r = subprocess.run(
        [sys.executable, "-c", ITERATE, str(ckpt)],
        env=vllm_runs.clean_env(True, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("FILTER ")), None)
    assert line is not None, r.stderr[-3000:]
    if line == "FILTER none":
        return None
    names: list[str] = json.loads(line[len("FILTER ") :])
    return names


def experts_read(names: list[str]) -> tuple[set[int], set[int], int]:
    """(experts whose weights were read, experts whose scales were read, expert weight tensors read)."""
    weights, scales, n = set(), set(), 0
    for name in names:
        m = EXPERT.search(name)
        if m:
            expert = int(m.group(1) or m.group(2))
            if m.group(3) in ("weight", "weight_packed"):
                weights.add(expert)
                n += 1
            else:
                scales.add(expert)
    return weights, scales, n


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import checkpoints

    root = tmp_path_factory.mktemp("epf")
    return {
        "legacy": checkpoints.write(root / "legacy", layout="legacy"),
        "canonical": checkpoints.write(root / "canonical", layout="canonical"),
        "legacy-packed": checkpoints.write(root / "legacy-packed", layout="legacy", packed_name="weight_packed"),
    }


@pytest.mark.parametrize("name", ["legacy", "legacy-packed"])
def test_a_rank_reads_only_its_experts_weights_with_legacy_names(exports: dict[str, Path], name: str) -> None:
    names = iterate(exports[name])
    if names is None:
        pytest.skip("this vLLM has no EP weight filter (0.24+)")
    weights, scales, n = experts_read(names)
    assert weights == {0, 1} and scales == {0, 1, 2, 3}, (weights, scales)
    assert n == 2 * 2 * 3  # layers x local experts x projections
    canonical = experts_read(iterate(exports["canonical"]) or [])
    assert (weights, scales, n) == canonical  # exactly what stock vLLM does on canonical names


def test_stock_vllm_reads_every_experts_weights_with_legacy_names(exports: dict[str, Path]) -> None:
    """The control: with the shim off, the filter does not see legacy expert ids (12 wasted reads)."""
    names = iterate(exports["legacy"], VLLM_MODELOPT_SHIM="0")
    if names is None:
        pytest.skip("this vLLM has no EP weight filter (0.24+)")
    weights, _scales, n = experts_read(names)
    assert weights == {0, 1, 2, 3} and n == 2 * 4 * 3
