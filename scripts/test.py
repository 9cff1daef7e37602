"""Run the test suite inside cached vLLM venvs (created on first use; see scripts/venv.py).

    python3 scripts/test.py                          # vLLM 0.32.0: unit, process, integration, e2e
    python3 scripts/test.py --vllm 0.17.1 0.33.0     # the same suite against other releases
    python3 scripts/test.py -- -k names              # extra arguments go to pytest

Exit status is pytest's (0 only if every run passed; "no tests ran" counts as failure).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import venv as venvs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", nargs="+", default=[venvs.DEFAULT_VERSION], metavar="VERSION")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    status = 0
    for version in args.vllm:
        python = venvs.ensure(version)
        # the matrix repeats what depends on the vLLM release; the rest runs with the default one
        paths = ["tests"] if version == venvs.DEFAULT_VERSION else ["tests/integration", "tests/process"]
        cmd = [str(python), "-m", "pytest", *paths, "-q", *args.pytest_args]
        print(f"== vLLM {version}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODELOPT_SHIM")}
        env.pop("PYTHONPATH", None)
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"== vLLM {version}: pytest exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
