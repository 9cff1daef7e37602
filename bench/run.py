"""Benchmark of vllm-modelopt-shim against stock vLLM, default settings (method: bench/README.md).

    python3 bench/run.py                                        # full run: 9 load pairs per workload
    python3 bench/run.py --quick --json bench/out/quick.json    # 5 pairs; also write the figures

Started with any python: vLLM and torch run only in fresh interpreters of the tests' cached vLLM venv
(scripts/venv.py).  A missed target prints FAIL and the exit status stays 0; it is nonzero only when
the benchmark itself fails.  Correctness is the tests' job, not this one's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import workloads  # noqa: E402

VLLM_VERSION = "0.32.0"
MARK = "BENCH-RESULT "

#: figure -> (target, --quick target, unit, meaning); None: printed, not a target.  Passes when <= target.
FIGURES: dict[str, tuple[float | None, float | None, str, str]] = {
    "startup_ratio": (1.15, 1.15, "x", "`python -c pass`, checkout on PYTHONPATH over without"),
    "own_over_stock_census": (1.25, 1.25, "x", "census: (stock load + the shim's own time) / stock load"),
    "own_over_stock_real": (1.25, 1.25, "x", "real size: (stock load + the shim's own time) / stock load"),
    "load_ratio_census": (None, None, "x", "census load_weights wall, shim over stock, median of pairs"),
    "load_ratio_real": (None, None, "x", "real-size load_weights wall, shim over stock, median of pairs"),
    "fold_s_per_layer": (0.1, 0.1, "s", "the Folder on one real-size MoE layer (128 experts)"),
    "awq_own_over_plain": (1.5, 1.5, "x", "real size: the shim's own time on NVFP4_AWQ over on plain NVFP4"),
    "extra_rss_mib": (64.0, 64.0, "MiB", "census load: peak RSS, shim minus stock"),
    "real_extra_rss_mib": (256.0, 256.0, "MiB", "real-size load: peak RSS, shim minus stock"),
    "doctor_s": (1.0, 2.0, "s", "`doctor DIR --json` on the census in 8 shards"),
}


class BenchError(RuntimeError):
    """The benchmark itself failed (not a missed target)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def vllm_python() -> Path:
    """The tests' cached vLLM venv (scripts/venv.py), created if missing."""
    spec = importlib.util.spec_from_file_location("_shim_venvs", ROOT / "scripts" / "venv.py")
    assert spec is not None and spec.loader is not None
    venvs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(venvs)
    return Path(venvs.ensure(VLLM_VERSION))


def base_env() -> dict[str, str]:
    """The environment without PYTHONPATH or shim variables (the shim's defaults), OMP_WAIT_POLICY defaulted.

    libgomp's spinning workers otherwise take the loading thread's core at random on 2 cores.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VLLM_MODELOPT_SHIM")}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def shim_env() -> dict[str, str]:
    return {**base_env(), "PYTHONPATH": str(ROOT)}


def measure(python: Path, args: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """Run one bench/worker.py measurement in a fresh ``python``; the JSON it reports."""
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as cwd:
        proc = subprocess.run(
            [str(python), str(HERE / "worker.py"), *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK) :])
            return result
    tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
    raise BenchError(f"worker {' '.join(args)} exited {proc.returncode} without a result:\n{tail}")


def prepare(python: Path, name: str) -> dict[str, Any]:
    """Workload ``name``'s manifest, writing it into the cache once (a temporary directory renamed into place)."""
    directory = workloads.cache_dir(name)
    if not (directory / "manifest.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        log(f"writing the {name} workload into {directory} (once; 1-3 min)")
        try:
            measure(python, ["write", name, str(tmp)], shim_env(), timeout=3600)
            shutil.rmtree(directory, ignore_errors=True)
            tmp.chmod(0o755)
            tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return manifest


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``cmd`` in a scratch directory, and its stdout; a failure or stderr output is an error."""
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as cwd:
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
    if proc.returncode != 0 or proc.stderr:
        raise BenchError(
            f"{' '.join(cmd)} (PYTHONPATH={env.get('PYTHONPATH')}) exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return elapsed, proc.stdout


def rotated(keys: list[Any], i: int) -> list[Any]:
    """``keys`` started at the i-th: the order alternates between rounds, so neither side always goes first."""
    return keys[i % len(keys) :] + keys[: i % len(keys)]


def startup(python: Path, runs: int) -> dict[str, Any]:
    """Median wall time of `python -c pass` with the checkout on PYTHONPATH (the doorbell) and without."""
    envs = {"on": shim_env(), "off": base_env()}
    cmd = [str(python), "-c", "pass"]
    for env in envs.values():  # warm the page cache; not timed
        for _ in range(3):
            timed(cmd, env)
    samples: dict[str, list[float]] = {k: [] for k in envs}
    for i in range(runs):
        for key in rotated(list(envs), i):
            samples[key].append(timed(cmd, envs[key])[0])
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"median_ms": ms, "ratio": ms["on"] / ms["off"]}


def doctor(directory: str, runs: int, tensors: int) -> dict[str, Any]:
    """Median wall time of `doctor DIR --json` in the interpreter running this driver (no vLLM needed)."""
    cmd = [sys.executable, "-m", "vllm_modelopt_shim", "doctor", directory, "--json"]
    seconds, out = [], ""
    for i in range(runs + 1):  # the first run warms the page cache; not timed
        elapsed, out = timed(cmd, shim_env())
        seconds += [elapsed] if i else []
    found = json.loads(out)
    if (found["verdict"], found["tensors"], found["shards"]) != ("needs-shim", tensors, workloads.SHARDS):
        raise BenchError(f"unexpected doctor result: {found}")
    return {"seconds": seconds, "median_s": statistics.median(seconds)}


def load_once(python: Path, ckpt: dict[str, Any], shim: bool) -> dict[str, Any]:
    """One load in a fresh interpreter: the shim on the legacy names, or stock vLLM on the canonical ones."""
    r = measure(python, ["load", ckpt["legacy" if shim else "canonical"]], shim_env() if shim else base_env())
    if r["shim"] != shim:
        raise BenchError(f"the shim is {'off' if shim else 'on'} in a load meant {'with' if shim else 'without'} it")
    if shim and (r["seen"], r["renamed"], r["refused"]) != (ckpt["tensors"], ckpt["expert_tensors"], 0):
        raise BenchError(f"the shim saw an unexpected stream: {r}")
    return r


def loads(python: Path, ckpt: dict[str, Any], pairs: int) -> dict[str, Any]:
    """``pairs`` (shim, stock) loads, the order alternating; paired wall ratios, own time, peak RSS."""
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for i in range(pairs):
        for shim in rotated([True, False], i):
            r = load_once(python, ckpt, shim)
            (on if shim else off).append(r)
            own = f", own {r['own_s']:.3f} s" if shim else ""
            log(
                f"{ckpt['name']} {i + 1}/{pairs} {'shim ' if shim else 'stock'}: load_weights {r['load_s']:.3f} s"
                f"{own}, peak RSS {r['maxrss_mib']:.0f} MiB"
            )
    stock_s = statistics.median(b["load_s"] for b in off)
    return {
        "shim_load_s": [a["load_s"] for a in on],
        "stock_load_s": [b["load_s"] for b in off],
        "own_s": [a["own_s"] for a in on],
        "shim_maxrss_mib": [a["maxrss_mib"] for a in on],
        "stock_maxrss_mib": [b["maxrss_mib"] for b in off],
        "load_ratio": statistics.median(a["load_s"] / b["load_s"] for a, b in zip(on, off, strict=True)),
        "own_over_stock": 1 + statistics.median(a["own_s"] for a in on) / stock_s,
        "extra_rss_mib": statistics.median(a["maxrss_mib"] - b["maxrss_mib"] for a, b in zip(on, off, strict=True)),
        "vllm": on[0]["vllm"],
    }


def awq_loads(python: Path, ckpt: dict[str, Any], runs: int) -> dict[str, Any]:
    """``runs`` shim loads of an NVFP4_AWQ workload (stock vLLM refuses it): the shim's own time."""
    done = [load_once(python, ckpt, True) for _ in range(runs)]
    for i, r in enumerate(done):
        log(f"{ckpt['name']} {i + 1}/{runs} shim: load_weights {r['load_s']:.3f} s, own {r['own_s']:.3f} s")
    return {"own_s": [r["own_s"] for r in done], "shim_load_s": [r["load_s"] for r in done]}


def table(result: dict[str, Any], quick: bool) -> str:
    """The figures, their targets and PASS/FAIL, one row each."""
    rows = [("figure", "value", "target", "result")]
    for key, (full, short, unit, _) in FIGURES.items():
        goal = short if quick else full
        value = f"{result[key]:.3f} {unit}" if unit != "MiB" else f"{result[key]:.1f} {unit}"
        verdict = "-" if goal is None else ("PASS" if result["pass"][key] else "FAIL")
        rows.append((key, value, "-" if goal is None else f"<= {goal:g} {unit}", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def machine(vllm: str) -> dict[str, Any]:
    """What the figures depend on: cores, CPU model, vLLM and the driver's python."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "vllm": vllm,
        "python": sys.version.split()[0],
        "omp_wait_policy": base_env()["OMP_WAIT_POLICY"],
    }


def bench(quick: bool, pairs: int) -> dict[str, Any]:
    """Every measurement, cheapest first; the figures with their targets and verdicts."""
    python = vllm_python()
    census, real, real_awq = prepare(python, "census"), prepare(python, "real"), prepare(python, "real-awq")
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("start-up: `python -c pass`, shim on and off", lambda: startup(python, 30 if quick else 60)),
        ("doctor on the census in 8 shards", lambda: doctor(census["sharded"], 3 if quick else 5, census["tensors"])),
        ("fold: one real-size MoE layer", lambda: measure(python, ["fold", real["legacy"]], shim_env())),
        (f"real-size loads: {pairs} pairs", lambda: loads(python, real, pairs)),
        (f"real-size NVFP4_AWQ loads with the shim: {pairs}", lambda: awq_loads(python, real_awq, pairs)),
        (f"census loads: {pairs} pairs", lambda: loads(python, census, pairs)),
    ]
    details: dict[str, dict[str, Any]] = {}
    keys = ("startup", "doctor", "fold", "real", "real_awq", "census")
    for (title, step), key in zip(steps, keys, strict=True):
        log(title)
        details[key] = step()
    result: dict[str, Any] = {
        "startup_ratio": details["startup"]["ratio"],
        "own_over_stock_census": details["census"]["own_over_stock"],
        "own_over_stock_real": details["real"]["own_over_stock"],
        "load_ratio_census": details["census"]["load_ratio"],
        "load_ratio_real": details["real"]["load_ratio"],
        "fold_s_per_layer": details["fold"]["median_s"],
        "awq_own_over_plain": statistics.median(details["real_awq"]["own_s"])
        / statistics.median(details["real"]["own_s"]),
        "extra_rss_mib": details["census"]["extra_rss_mib"],
        "real_extra_rss_mib": details["real"]["extra_rss_mib"],
        "doctor_s": details["doctor"]["median_s"],
    }
    goals = {k: (short if quick else full) for k, (full, short, _, _) in FIGURES.items()}
    result["targets"] = {k: g for k, g in goals.items() if g is not None}
    result["pass"] = {k: result[k] <= g for k, g in result["targets"].items()}
    result["mode"] = "quick" if quick else "full"
    result["machine"] = machine(details["census"]["vllm"])
    result["details"] = details
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 5 load pairs, fewer start-up runs")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    parser.add_argument("--pairs", type=int, help="load pairs per workload (default 5 quick, 9 full)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be at least 1")
    started = time.monotonic()
    try:
        result = bench(args.quick, args.pairs or (5 if args.quick else 9))
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 2
    result["wall_s"] = round(time.monotonic() - started)
    print(table(result, args.quick))
    misses = [k for k, ok in result["pass"].items() if not ok]
    print(f"targets missed: {', '.join(misses)}" if misses else "all targets met", f"({result['wall_s']} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
