"""Fresh interpreters with the checkout on PYTHONPATH: cheap, harmless, toggled by the environment.

Plain Python only (no vLLM import), so these take a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import vllm_runs

ROOT = vllm_runs.ROOT
MODULES = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def py(code: str, shim: bool = True, extra_path: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    e = vllm_runs.clean_env(shim, **env)
    if extra_path is not None:
        e["PYTHONPATH"] = f"{e['PYTHONPATH']}:{extra_path}" if shim else str(extra_path)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=60)


def test_startup_imports_nothing_heavy() -> None:
    bare = set(json.loads(py(MODULES, shim=False).stdout))
    armed = set(json.loads(py(MODULES).stdout))
    extra = armed - bare
    assert (
        not {m for m in armed if m.split(".")[0] in ("wrapt", "torch", "vllm", "typing", "logging", "importlib")} - bare
    )
    assert extra == {"sitecustomize"}, extra  # the package itself loads only when vLLM's module does


ARMED = "import sys; print(any(getattr(f, 'vllm_modelopt_shim', False) for f in sys.meta_path))"


def test_the_hook_is_armed_by_default_and_disarmed_by_the_toggle() -> None:
    code = ARMED
    assert py(code).stdout.strip() == "True"
    assert py(code, VLLM_MODELOPT_SHIM="1").stdout.strip() == "True"
    assert py(code, VLLM_MODELOPT_SHIM="0").stdout.strip() == "False"
    assert py(code, VLLM_MODELOPT_SHIM="off").stdout.strip() == "False"


def test_an_unknown_toggle_value_stays_on_and_is_silent_in_processes_without_vllm() -> None:
    r = py(ARMED, VLLM_MODELOPT_SHIM="maybe")
    assert r.stdout.strip() == "True" and r.returncode == 0 and r.stderr == ""


def _shadowed(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "system"
    d.mkdir()
    (d / "sitecustomize.py").write_text(body)
    return d


def test_the_shadowed_sitecustomize_still_runs_exactly_once(tmp_path: Path) -> None:
    d = _shadowed(tmp_path, "import builtins\nbuiltins.SHADOWED = getattr(builtins, 'SHADOWED', 0) + 1\n")
    code = "import builtins, runpy, sitecustomize; runpy.run_path(sitecustomize.__file__); print(builtins.SHADOWED)"
    assert py(code, extra_path=d).stdout.strip() == "1"  # imported twice, chained once
    assert py(code, extra_path=d, VLLM_MODELOPT_SHIM="0").stdout.strip() == "1"  # toggle off: still chained


def test_importing_the_doorbell_twice_arms_one_hook(tmp_path: Path) -> None:
    code = (
        "import runpy, sys, sitecustomize; runpy.run_path(sitecustomize.__file__); "
        "print(sum(getattr(f, 'vllm_modelopt_shim', False) for f in sys.meta_path))"
    )
    assert py(code).stdout.strip() == "1"


def test_a_failing_shadowed_sitecustomize_is_reported_and_start_up_continues(tmp_path: Path) -> None:
    d = _shadowed(tmp_path, "raise RuntimeError('broken distro hook')\n")
    r = py(ARMED, extra_path=d)
    assert r.returncode == 0 and r.stdout.strip() == "True"
    assert "broken distro hook" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _unexpected_vllm(tmp_path: Path) -> Path:
    """A 'vllm' whose qwen3_vl_moe module lacks the class we patch (as a future release might)."""
    models = tmp_path / "target" / "vllm" / "model_executor" / "models"
    models.mkdir(parents=True)
    for d in (models.parent.parent, models.parent, models):
        (d / "__init__.py").write_text("")
    (models / "qwen3_vl_moe.py").write_text("VALUE = 42\n")
    return tmp_path / "target"


def _import_target(tmp_path: Path, checkout: Path) -> subprocess.CompletedProcess[str]:
    e = vllm_runs.clean_env(False)
    e["PYTHONPATH"] = f"{checkout}:{_unexpected_vllm(tmp_path)}"
    code = "import vllm.model_executor.models.qwen3_vl_moe as m; print(m.VALUE)"
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_a_vllm_that_does_not_look_as_expected_is_left_untouched_with_one_line(tmp_path: Path) -> None:
    r = _import_target(tmp_path, ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Qwen3VLMoeForConditionalGeneration.load_weights not found" in lines[0]
    assert "left untouched" in lines[0]


def test_a_broken_package_never_breaks_the_import_it_hooks(tmp_path: Path) -> None:
    """Even a half-copied checkout only costs one stderr line: the hooked import still succeeds."""
    fake = tmp_path / "checkout"
    (fake / "vllm_modelopt_shim").mkdir(parents=True)
    (fake / "sitecustomize.py").write_text((ROOT / "sitecustomize.py").read_text())
    (fake / "vllm_modelopt_shim" / "__init__.py").write_text("raise ImportError('half-copied checkout')\n")
    r = _import_target(tmp_path, fake)
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    assert "half-copied checkout" in r.stderr and "vLLM runs stock" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
