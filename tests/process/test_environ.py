"""vLLM's environment check knows the shim's variables: PYTHONPATH doorbell and pip entry point alike.

vLLM checks every VLLM_* variable against ``vllm.envs.environment_variables`` when it builds its
config (``EngineArgs.create_engine_config``, in the process that starts vLLM: ``LLM(...)`` or the
API server); with ``fail_on_environ_validation=True`` an unknown one is a ValueError.  Each test
builds a real config in a fresh interpreter of this venv's vLLM with every shim variable set.
The end-to-end servers (engine core, workers) are in tests/e2e/test_ep_filter.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import vllm_runs

pytestmark = pytest.mark.vllm
pytest.importorskip("torch", reason="environment tests run inside a vLLM venv: python3 scripts/test.py")

ROOT = vllm_runs.ROOT
UNKNOWN = "Unknown vLLM environment variable"
CONFIG = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])  # tests/: the harness's test-only CPU settings
    import harness

    harness.force_cpu_platform()
    harness.allow_x86_cpu_without_triton()
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
                      max_model_len=1024, fail_on_environ_validation=True)
    args.create_engine_config()
    print("CONFIG OK", flush=True)
    """
)


def shim_variables(tmp: Path) -> dict[str, str]:
    """Every variable the shim registers, set (the tools' folders point at scratch space)."""
    from vllm_modelopt_shim import envnames

    folders = {"REPORT": "reports", "VENVS": "venvs", "RESULTS": "results", "BENCH": "bench"}
    values = {f"VLLM_MODELOPT_SHIM_{k}": str(tmp / v) for k, v in folders.items()}
    values["VLLM_MODELOPT_SHIM_VERIFY"] = "error"
    values["VLLM_MODELOPT_SHIM_AWQ"] = "fold"
    return {name: values.get(name, "1") for name in envnames.NAMES}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import checkpoints

    return checkpoints.write(tmp_path_factory.mktemp("environ") / "modelopt-legacy")


def build_config(ckpt: Path, tmp: Path, pythonpath: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    e = vllm_runs.clean_env(shim=False, **{**shim_variables(tmp), **env})
    e.pop("VLLM_PLUGINS", None)
    if pythonpath is not None:
        e["PYTHONPATH"] = pythonpath
    script = tmp / "config.py"
    script.write_text(CONFIG)
    return subprocess.run(
        [sys.executable, str(script), str(ckpt), str(ROOT / "tests")],
        env=e,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp,
    )


def assert_starts_quietly(r: subprocess.CompletedProcess[str]) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "CONFIG OK" in r.stdout, out[-4000:]
    assert UNKNOWN not in out, [x for x in out.splitlines() if UNKNOWN in x]


def test_without_the_shim_this_vllm_refuses_our_variables(ckpt: Path, tmp_path: Path) -> None:
    """The control: this release does check, so the tests below would see an unregistered name."""
    r = build_config(ckpt, tmp_path, None)
    assert r.returncode != 0 and f"{UNKNOWN} detected: VLLM_MODELOPT_SHIM" in r.stdout + r.stderr, r.stderr[-3000:]


def test_with_the_doorbell_every_shim_variable_is_known(ckpt: Path, tmp_path: Path) -> None:
    assert_starts_quietly(build_config(ckpt, tmp_path, str(ROOT)))


def test_with_the_doorbell_and_the_shim_off_its_variables_are_still_known(ckpt: Path, tmp_path: Path) -> None:
    """VLLM_MODELOPT_SHIM=0 leaves vLLM stock: it must not make vLLM refuse to start either."""
    assert_starts_quietly(build_config(ckpt, tmp_path, str(ROOT), VLLM_MODELOPT_SHIM="0"))


def test_with_the_pip_entry_point_every_shim_variable_is_known(ckpt: Path, tmp_path: Path, pip_target: Path) -> None:
    """vLLM loads general plugins in EngineArgs.__post_init__, before create_engine_config checks."""
    assert_starts_quietly(build_config(ckpt, tmp_path, str(pip_target)))


def test_with_the_pip_entry_point_and_the_shim_off_its_variables_are_still_known(
    ckpt: Path, tmp_path: Path, pip_target: Path
) -> None:
    assert_starts_quietly(build_config(ckpt, tmp_path, str(pip_target), VLLM_MODELOPT_SHIM="0"))


def test_registration_changes_no_value_vllm_hashes(tmp_path: Path) -> None:
    """vLLM hashes every registered variable's value into its compile-cache key: ours read as None."""
    e = vllm_runs.clean_env(shim=True, **shim_variables(tmp_path))
    code = (
        "import json, vllm.envs as envs; from vllm_modelopt_shim import envnames\n"
        "print(json.dumps(sorted(n for n in envnames.NAMES if n in envs.environment_variables)))\n"
        "print(json.dumps({n: getattr(envs, n) for n in envnames.NAMES}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
    from vllm_modelopt_shim import envnames

    lines = r.stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == sorted(envnames.NAMES), r.stderr[-3000:]
    assert set(json.loads(lines[1]).values()) == {None}
