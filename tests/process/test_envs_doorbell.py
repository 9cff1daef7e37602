"""The doorbell's second duty, on a stand-in vLLM: vllm.envs learns the shim's variables at import.

Plain Python (a fake ``vllm`` package), so these take a second; tests/process/test_environ.py does
the same against the real release.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vllm_runs

ROOT = vllm_runs.ROOT
PROBE = (
    "import importlib.machinery, json, sys, vllm.envs as envs\n"
    "print(json.dumps({'names': sorted(n for n in envs.environment_variables if 'SHIM' in n),\n"
    "  'loader_restored': isinstance(envs.__loader__, importlib.machinery.SourceFileLoader),\n"
    "  'patch_hook': any(getattr(f, 'vllm_modelopt_shim', False) for f in sys.meta_path)}))\n"
)


def fake_vllm(tmp_path: Path, envs: str) -> Path:
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "envs.py").write_text(envs)
    return pkg.parent


def run(tmp_path: Path, envs: str, checkout: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    e = vllm_runs.clean_env(False, **env)
    e["PYTHONPATH"] = f"{checkout}:{fake_vllm(tmp_path, envs)}"
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


REGISTRY = "environment_variables = {'VLLM_HOST_IP': lambda: ''}\n"


def test_importing_vllm_envs_registers_every_shim_variable(tmp_path: Path) -> None:
    import json

    from vllm_modelopt_shim import envnames

    r = run(tmp_path, REGISTRY)
    out = json.loads(r.stdout)
    assert out["names"] == sorted(envnames.NAMES) and out["loader_restored"] and out["patch_hook"], r.stderr
    assert r.stderr == ""
    assert {"VLLM_MODELOPT_SHIM", "VLLM_MODELOPT_SHIM_HARMONIZE", "VLLM_MODELOPT_SHIM_AWQ"} <= set(out["names"])


def test_with_the_shim_off_the_variables_are_registered_and_nothing_is_patched(tmp_path: Path) -> None:
    import json

    from vllm_modelopt_shim import envnames

    out = json.loads(run(tmp_path, REGISTRY, VLLM_MODELOPT_SHIM="0").stdout)
    assert out["names"] == sorted(envnames.NAMES) and out["patch_hook"] is False


def test_a_vllm_without_the_registry_imports_fine_with_one_line(tmp_path: Path) -> None:
    e = vllm_runs.clean_env(False)
    fake = fake_vllm(tmp_path, "VALUE = 1\n")
    e["PYTHONPATH"] = f"{ROOT}:{fake}"
    p = subprocess.run(
        [sys.executable, "-c", "import vllm.envs as e; print(e.VALUE)"],
        env=e,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "environment_variables not found" in lines[0], lines


def test_a_broken_package_never_breaks_importing_vllm_envs(tmp_path: Path) -> None:
    fake = tmp_path / "checkout"
    (fake / "vllm_modelopt_shim").mkdir(parents=True)
    (fake / "sitecustomize.py").write_text((ROOT / "sitecustomize.py").read_text())
    (fake / "vllm_modelopt_shim" / "__init__.py").write_text("raise ImportError('half-copied checkout')\n")
    r = run(tmp_path, REGISTRY, checkout=fake)
    assert r.returncode == 0 and '"names": []' in r.stdout, r.stderr
    assert "half-copied checkout" in r.stderr and len(r.stderr.strip().splitlines()) == 1
