"""The patch in real vLLM processes: spawned children, the toggle, a missing wrapt, no residue."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import vllm_runs

pytestmark = pytest.mark.vllm

pytest.importorskip("torch", reason="activation tests run inside a vLLM venv: python3 scripts/test.py")

PROBE = textwrap.dedent(
    """
    import json, multiprocessing as mp

    def probe(q):
        try:
            q.put(inspect())
        except BaseException:
            import traceback
            q.put({"error": traceback.format_exc()})

    def plain(f):
        return type(f).__name__ == "function"

    def inspect():
        import importlib.machinery, os
        import vllm.model_executor.models.qwen3_vl as base
        import vllm.model_executor.models.qwen3_vl_moe as m
        from vllm_modelopt_shim import patch
        cls = m.Qwen3VLMoeForConditionalGeneration
        own = cls.__dict__.get("load_weights")
        siblings = [c for c in base.Qwen3VLForConditionalGeneration.__subclasses__() if c is not cls]
        before = {
            "applied": patch.is_applied(),
            "wrapped": type(own).__name__ if own is not None else None,
            "base_untouched": plain(base.Qwen3VLForConditionalGeneration.__dict__["load_weights"]),
            "siblings_untouched": all(plain(c.__dict__.get("load_weights", plain)) for c in siblings),
            "loader_restored": isinstance(m.__loader__, importlib.machinery.SourceFileLoader),
        }
        if before["applied"]:
            patch.apply(m)  # a second install (plugin + PYTHONPATH) must not stack
            before["not_stacked"] = type(cls.__dict__["load_weights"].__wrapped__).__name__ == "function"
            patch.remove(m)
            before["no_residue"] = "load_weights" not in cls.__dict__
        return before

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=probe, args=(q,))
        p.start()
        print("PROBE " + json.dumps(q.get(timeout=300)))
        p.join()
    """
)


def run_probe(tmp_path, **env: str) -> tuple[dict[str, object], str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = subprocess.run(
        [sys.executable, str(script)], env=vllm_runs.clean_env(True, **env), capture_output=True, text=True, timeout=900
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    return json.loads(line[6:]), r.stderr


def test_the_patch_activates_in_a_spawned_child_on_that_class_only(tmp_path) -> None:
    result, _ = run_probe(tmp_path)
    assert result == {
        "applied": True,
        "wrapped": "FunctionWrapper",
        "base_untouched": True,
        "siblings_untouched": True,
        "loader_restored": True,
        "not_stacked": True,
        "no_residue": True,
    }


def test_an_unknown_toggle_value_warns_once_in_vllm_processes_and_stays_on(tmp_path) -> None:
    result, stderr = run_probe(tmp_path, VLLM_MODELOPT_SHIM="maybe")
    assert result["applied"] is True
    lines = [x for x in stderr.splitlines() if "VLLM_MODELOPT_SHIM=" in x]
    assert len(lines) == 1 and "'maybe'" in lines[0] and "1/true/on/yes" in lines[0] and "0/false/off/no" in lines[0]


def test_the_toggle_leaves_vllm_untouched_in_children(tmp_path) -> None:
    result, _ = run_probe(tmp_path, VLLM_MODELOPT_SHIM="0")
    assert result["applied"] is False and result["wrapped"] is None


def test_without_wrapt_vllm_is_left_untouched_with_one_warning(tmp_path) -> None:
    code = (
        "import sys; sys.modules['wrapt'] = None\n"  # what a venv without wrapt looks like to `import wrapt`
        "import vllm.model_executor.models.qwen3_vl_moe as m\n"
        "print('OWN', 'load_weights' in m.Qwen3VLMoeForConditionalGeneration.__dict__)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=vllm_runs.clean_env(True), capture_output=True, text=True, timeout=900
    )
    assert "OWN False" in r.stdout, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "vllm-modelopt-shim" in x]
    assert len(lines) == 1 and "pip install wrapt" in lines[0], lines


def test_status_says_what_the_shim_does_in_this_interpreter() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vllm_modelopt_shim", "status"],
        env=vllm_runs.clean_env(True, VLLM_MODELOPT_SHIM_VERIFY="warn"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "shim: on (default)" in out and "verify=warn" in out and "wrapt: " in out
    assert "Qwen3VLMoeForConditionalGeneration.load_weights found" in out
    assert "patch applied: True" in out


def status(env: dict[str, str], cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_modelopt_shim", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )


def test_status_from_a_checkout_without_pythonpath_says_what_is_missing() -> None:
    r = status(vllm_runs.clean_env(False), cwd=str(vllm_runs.ROOT))  # python -m finds the package in cwd only
    assert "armed by: neither" in r.stdout and f"PYTHONPATH={vllm_runs.ROOT}" in r.stdout, r.stdout
    assert "patch applied: False (no hook is armed in this interpreter)" in r.stdout, r.stdout


def test_a_bad_value_warns_once_per_process() -> None:
    r = status(vllm_runs.clean_env(True, VLLM_MODELOPT_SHIM="maybe"))
    assert r.returncode == 0
    warnings = [x for x in r.stderr.splitlines() if "VLLM_MODELOPT_SHIM='maybe'" in x]
    assert len(warnings) == 1, r.stderr
