"""End to end on CPU: vLLM's expert-parallel weight filter with legacy names, and the environment check.

``vllm serve`` (vllm-cpu 0.32.0) at TP=2 with ``--enable-expert-parallel --enable-ep-weight-filter
--fail-on-environ-validation``: an API server, an engine core and two workers, each EP rank holding
2 of the 4 experts.  The test-only CPU plugin records every tensor vLLM reads from disk
(``E2E_READ_LOG``), per process.

    shim_epf           PYTHONPATH=<checkout> (the doorbell), legacy names, VLLM_MODELOPT_SHIM_HARMONIZE=0
    plugin_epf         the pip-installed package only (its vllm.general_plugins entry point), the same
    stock_epf          no shim, the same tensors under canonical names
    shim_epf_default   the doorbell with default settings (harmonization on)

Each rank must read exactly the weight tensors of its own experts (stock reads the same on canonical
names), the answers must equal stock's bit for bit, and vLLM must not call any shim variable unknown.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

from e2e import tiny_model
from e2e.test_serve import _assert_equal, _query, _server

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

FLAGS = ("--enable-expert-parallel", "--enable-ep-weight-filter", "--fail-on-environ-validation")
UNKNOWN = "Unknown vLLM environment variable"
EXPERT = re.compile(
    r"\.layers\.(?P<layer>\d+)\.mlp\.experts\."
    r"(?:(?P<proj>gate_proj|up_proj|down_proj)\.(?P<e>\d+)|(?P<e2>\d+)\.(?P<proj2>\w+))\.(?P<suffix>\w+)$"
)
LAYERS, EXPERTS, EP = 2, 4, 2
_results: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_model.write(tmp_path_factory.mktemp("epf-ckpt"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("epf-run")


@pytest.fixture(scope="module")
def pip_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install <checkout>` into a folder: the package and its entry point, no sitecustomize."""
    tmp = tmp_path_factory.mktemp("epf-pip")
    src = tmp / "src"
    shutil.copytree(vllm_runs.ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build"))
    target = tmp / "target"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return target


def reads(directory: Path) -> dict[int, Counter[tuple[int, int, str, str]]]:
    """pid -> (layer, expert, projection, suffix) -> how often that process read the tensor from disk."""
    out: dict[int, Counter[tuple[int, int, str, str]]] = {}
    for f in directory.glob("reads-*.txt"):
        seen: Counter[tuple[int, int, str, str]] = Counter()
        for name in f.read_text().split():
            m = EXPERT.search(name)
            if m:
                expert = int(m.group("e") or m.group("e2"))
                seen[(int(m.group("layer")), expert, m.group("proj") or m.group("proj2"), m.group("suffix"))] += 1
        if seen:
            out[int(f.stem.split("-")[1])] = seen
    return out


def _served(key: str, ckpts: dict[str, Path], workdir: Path, pip_target: Path) -> dict[str, Any]:
    if key not in _results:
        log_dir = workdir / f"reads-{key}"
        log_dir.mkdir()
        env = {"E2E_READ_LOG": str(log_dir), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
        if key in ("shim_epf", "plugin_epf"):
            env["VLLM_MODELOPT_SHIM_HARMONIZE"] = "0"  # byte-exact: equal to stock bit for bit
        if key == "plugin_epf":
            env["PYTHONPATH"] = str(pip_target)
        ckpt = ckpts["canonical" if key == "stock_epf" else "legacy"]
        with _server(key, ckpt, workdir, shim=key.startswith("shim"), tp=2, args=FLAGS, **env) as info:
            assert info["startup_s"], f"{key} exited:\n{info['log'].read_text()[-6000:]}"
            answers = _query(info["port"])
        _results[key] = {"answers": answers, "log": info["log"].read_text(), "reads": reads(log_dir)}
    return _results[key]


def _assert_each_rank_reads_only_its_experts(run: dict[str, Any], key: str) -> list[int]:
    per_rank = run["reads"]
    assert len(per_rank) == EP, f"{key}: expert tensors read by {len(per_rank)} processes, not {EP}"
    weights_read = []
    held = []
    for seen in per_rank.values():
        experts = sorted({e for (_l, e, _p, s) in seen if s in ("weight", "weight_packed")})
        held.append(experts)
        weights = [k for k in seen if k[3] in ("weight", "weight_packed")]
        assert all(seen[k] == 1 for k in weights), f"{key}: a weight read twice: {seen}"
        weights_read.append(len(weights))
        scales = {e for (_l, e, _p, s) in seen if s not in ("weight", "weight_packed")}
        assert scales == set(range(EXPERTS)), f"{key}: scales are vLLM's to keep for every expert: {scales}"
    # linear placement: rank 0 holds experts 0-1, rank 1 experts 2-3; 3 projections per expert and layer
    assert sorted(held) == [[0, 1], [2, 3]], f"{key}: experts whose weights each rank read: {held}"
    assert weights_read == [LAYERS * (EXPERTS // EP) * 3] * EP, weights_read
    return weights_read


@pytest.mark.parametrize("door", ["shim_epf", "plugin_epf"])
def test_each_ep_rank_reads_only_its_experts_weights_and_serves_exactly_as_stock(
    door: str, ckpts: dict[str, Path], workdir: Path, pip_target: Path
) -> None:
    shim = _served(door, ckpts, workdir, pip_target)
    stock = _served("stock_epf", ckpts, workdir, pip_target)
    assert "EP weight filter: ep_size=2, ep_rank=0, loading 2/4 experts" in shim["log"]  # vLLM's filter is on
    stock_reads = _assert_each_rank_reads_only_its_experts(stock, "stock (canonical)")
    shim_reads = _assert_each_rank_reads_only_its_experts(shim, f"{door} (legacy)")
    assert shim_reads == stock_reads
    # the shim judged each rank on its own experts: two summaries, no false error or warning
    summaries = re.findall(r"vllm-modelopt-shim: (\d+) tensors seen, (\d+) renamed", shim["log"])
    assert len(summaries) == EP, shim["log"][-6000:]
    assert not re.search(r"WARNING[^\n]*vllm-modelopt-shim", shim["log"]) and "problem(s) logged" not in shim["log"]
    _assert_equal(shim["answers"], stock["answers"], f"{door} EP=2 + filter (legacy) vs stock (canonical)")
    print(f"[e2e] {door}: each rank read {shim_reads[0]} expert weight tensors (stock: {stock_reads[0]})")


@pytest.mark.parametrize("door", ["shim_epf", "plugin_epf"])
def test_fail_on_environ_validation_starts_with_shim_variables_set(
    door: str, ckpts: dict[str, Path], workdir: Path, pip_target: Path
) -> None:
    """API server, engine core and both workers: started (the check is fatal here) and no warning."""
    log = _served(door, ckpts, workdir, pip_target)["log"]
    assert UNKNOWN not in log, [x for x in log.splitlines() if UNKNOWN in x]
    assert len(set(re.findall(r"\(Worker[^ ]* pid=(\d+)\)", log))) == EP  # the workers did run


def test_with_default_settings_the_filter_and_harmonization_agree(
    ckpts: dict[str, Path], workdir: Path, pip_target: Path
) -> None:
    """Harmonization on (the default) folds scales, which every rank still reads: same reads, no warning."""
    shim = _served("shim_epf_default", ckpts, workdir, pip_target)
    _assert_each_rank_reads_only_its_experts(shim, "shim_epf_default (legacy)")
    assert len(re.findall(r"vllm-modelopt-shim: (\d+) tensors seen", shim["log"])) == EP, shim["log"][-6000:]
    assert not re.search(r"WARNING[^\n]*vllm-modelopt-shim", shim["log"]) and "problem(s) logged" not in shim["log"]
    assert all(len(a["token_ids"]) == 12 for a in shim["answers"].values())
