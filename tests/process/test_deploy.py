"""The three ways to deploy: PYTHONPATH (everywhere else), pip (entry point), Docker layer (its steps).

No Docker engine runs here: the Dockerfile's own COPY/RUN/ENV steps are executed into a fresh venv
that stands in for the official image (its vLLM is the suite's vLLM, reached through a .pth).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import vllm_runs

pytestmark = pytest.mark.vllm
pytest.importorskip("torch", reason="deployment tests run inside a vLLM venv: python3 scripts/test.py")

ROOT = vllm_runs.ROOT


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import checkpoints

    return checkpoints.write(tmp_path_factory.mktemp("deploy") / "modelopt-legacy")


def harness(python: str, ckpt: Path, env: dict[str, str]) -> dict[str, Any]:
    import json

    r = subprocess.run(
        [python, str(ROOT / "tests" / "harness.py"), str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ckpt.parent,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("HARNESS ")), None)
    assert line is not None, r.stderr[-3000:]
    result: dict[str, Any] = json.loads(line[8:])
    return result


def test_the_wheel_installs_the_package_and_its_entry_point_but_no_sitecustomize(pip_target: Path) -> None:
    assert not (pip_target / "sitecustomize.py").exists()
    assert (pip_target / "vllm_modelopt_shim" / "py.typed").exists()
    (entry_points,) = pip_target.glob("vllm_modelopt_shim-*.dist-info/entry_points.txt")
    assert "[vllm.general_plugins]" in entry_points.read_text()
    assert "vllm_modelopt_shim.plugin:register" in entry_points.read_text()


def test_a_pip_installed_copy_patches_vllm_through_the_entry_point(pip_target: Path, legacy: Path) -> None:
    env = vllm_runs.clean_env(shim=False, VLLM_MODELOPT_SHIM_HARMONIZE="0")
    env["PYTHONPATH"] = str(pip_target)  # the package only: no sitecustomize anywhere
    r = harness(sys.executable, legacy, env)
    assert r["stage"] == "loaded" and r["patched"] is True and r["mismatched"] == [] and r["unwritten"] == []


def test_after_pip_install_status_and_the_console_script_say_the_entry_point_arms_it(pip_target: Path) -> None:
    env = vllm_runs.clean_env(shim=False)
    env["PYTHONPATH"] = str(pip_target)  # a pip user: no checkout on the path
    script = pip_target / "bin" / "vllm-modelopt-shim"
    assert script.is_file(), sorted(p.name for p in (pip_target / "bin").iterdir())
    for cmd in ([str(script), "status"], [sys.executable, "-m", "vllm_modelopt_shim", "status"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=pip_target.parent)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "armed by: vllm.general_plugins entry point" in r.stdout, r.stdout
        assert "patch applied: True" in r.stdout, r.stdout
    off = subprocess.run(
        [str(script), "status"], env={**env, "VLLM_MODELOPT_SHIM": "0"}, capture_output=True, text=True, timeout=900
    )
    assert "patch applied: False (VLLM_MODELOPT_SHIM is off)" in off.stdout, off.stdout


def test_plugin_and_pythonpath_together_patch_once(pip_target: Path, legacy: Path) -> None:
    env = vllm_runs.clean_env(shim=True, VLLM_MODELOPT_SHIM_HARMONIZE="0")
    env["PYTHONPATH"] = f"{ROOT}:{pip_target}"
    r = harness(sys.executable, legacy, env)
    assert r["stage"] == "loaded" and len([x for x in r["shim_log"] if "tensors seen" in x]) == 1


# -- Docker ---------------------------------------------------------------------------------------
def dockerfile_steps() -> list[tuple[str, str]]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(FROM|ARG|COPY|RUN|ENV)\s+(.*)$", text, re.M)]


def test_the_dockerfile_layers_on_the_official_image() -> None:
    steps = dockerfile_steps()
    assert ("ARG", "VLLM_IMAGE=vllm/vllm-openai:v0.32.0") in steps
    assert steps[1] == ("FROM", "${VLLM_IMAGE}")
    env = [v for k, v in steps if k == "ENV"]
    assert env == ["PYTHONPATH=/opt/vllm-modelopt-shim${PYTHONPATH:+:${PYTHONPATH}}"]  # keeps any existing value


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, str]]:
    """Execute the Dockerfile's steps into a fresh venv standing in for the official image."""
    tmp = tmp_path_factory.mktemp("image")
    rootfs, venv = tmp / "rootfs", tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    Path(site.stdout.strip(), "official-image-vllm.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = vllm_runs.clean_env(shim=False)
    env["PYTHONPATH"] = "/somewhere/else"  # the image may set one already: it must be kept
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    for kind, arg in dockerfile_steps():
        arg = arg.replace("/opt/", f"{rootfs}/opt/")
        if kind == "COPY":
            src, dst = shlex.split(arg)
            dst_path = Path(dst)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, dst_path, dirs_exist_ok=True)
            else:
                dst_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, dst_path)
        elif kind == "RUN":
            subprocess.run(["bash", "-c", arg.replace("python3 ", f"{python} ")], check=True, env=env, timeout=600)
        elif kind == "ENV":
            key, value = arg.split("=", 1)
            env[key] = subprocess.run(
                ["bash", "-c", f'echo "{value}"'], env=env, capture_output=True, text=True
            ).stdout.strip()
    return python, rootfs, env


def test_the_image_keeps_an_existing_pythonpath(image: tuple[str, Path, dict[str, str]]) -> None:
    _, rootfs, env = image
    assert env["PYTHONPATH"] == f"{rootfs}/opt/vllm-modelopt-shim:/somewhere/else"


def test_the_image_arms_the_shim_and_honours_the_toggle(image: tuple[str, Path, dict[str, str]], legacy: Path) -> None:
    python, _, env = image
    on = harness(python, legacy, {**env, "VLLM_MODELOPT_SHIM_HARMONIZE": "0"})
    assert on["stage"] == "loaded" and on["patched"] is True and on["mismatched"] == []
    off = harness(python, legacy, {**env, "VLLM_MODELOPT_SHIM": "0"})
    assert off["stage"] == "load" and off["patched"] is False and off["error"] in ("AttributeError", "IndexError")
    assert os.environ.get("VLLM_MODELOPT_SHIM") is None
