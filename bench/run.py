"""Performance benchmark of vllm-modelopt-shim: what users run, default settings, as ratios against stock vLLM.

    python3 bench/run.py                    # full run (~15 min on 2 cores): 9 load pairs per workload
    python3 bench/run.py --quick            # short run (~10 min): 5 pairs, looser targets
    python3 bench/run.py --quick --json bench/out/quick.json   # also write the figures (bench/out/ is ignored)
    python3 bench/run.py --prepare          # only write the cached workloads

Started with any python: everything that needs vLLM or torch runs in fresh interpreters of the
tests' cached vLLM 0.32.0 venv (scripts/venv.py creates it on first use), shim on (PYTHONPATH=<checkout>)
and stock (no PYTHONPATH) interleaved, the order alternating every pair, with the shim's defaults.
Workloads (bench/workloads.py): the Qwen3-VL-30B-A3B tensor census at tiny dimensions, 2 MoE
layers at its real MoE dimensions, and those written 4 times over (8 layers, 4 shards) for convert;
measurements: bench/worker.py; figures and targets: bench/figures.py.

Benchmarks are not tests: a missed target is printed as FAIL and the exit status stays 0; it is
nonzero only when the benchmark itself fails.  Correctness (every tensor forwarded as read, the
fold's bytes) is proven by the tests, not here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import figures  # noqa: E402
import workloads  # noqa: E402

VLLM_VERSION = "0.32.0"
MARK = "BENCH-RESULT "


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


def plain_python3() -> str | None:
    """The real interpreter behind `python3` on PATH (resolving pyenv-style shims), if any."""
    found = shutil.which("python3")
    if found is None:
        return None
    try:
        out = subprocess.run(
            [found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=60, check=True
        )
        return out.stdout.strip() or found
    except (OSError, subprocess.SubprocessError):
        return found


#: unless set already: libgomp's spinning worker threads otherwise take the loading thread's core on a
#: 2-core machine at random, making one stock load 2 s or 6 s (the same for shim and stock)
OMP_WAIT_POLICY = "PASSIVE"


def base_env() -> dict[str, str]:
    """os.environ without PYTHONPATH or any shim variable (everything else, as it is; OMP_WAIT_POLICY
    defaulted)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VLLM_MODELOPT_SHIM")}
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return env


def shim_env() -> dict[str, str]:
    return {**base_env(), "PYTHONPATH": str(ROOT)}


def measure(python: Path, args: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """Run one bench/worker.py measurement in ``python``; the JSON it reports."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as cwd:
        proc = subprocess.run(
            [str(python), str(HERE / "worker.py"), *args], env=env, cwd=cwd, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK) :])
            result["subprocess_s"] = time.perf_counter() - started
            return result
    tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
    raise BenchError(f"worker {' '.join(args)} exited {proc.returncode} without a result:\n{tail}")


def prepare(python: Path, name: str) -> dict[str, Any]:
    """A workload's manifest, writing it once into the cache."""
    directory = workloads.cache_dir(name)
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        log(f"writing the {name} workload into {directory} (once; 1-3 min)")
        try:
            measure(python, ["write", name, str(tmp)], shim_env(), timeout=3600)
            if directory.exists():
                shutil.rmtree(directory)
            tmp.chmod(0o755)
            tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info: dict[str, Any] = json.loads(manifest.read_text())
    return info


# -- start-up ----------------------------------------------------------------------------------------
NAIVE_SITECUSTOMIZE = '''"""A naive shim doorbell: imports wrapt eagerly in every interpreter."""
import sys

import wrapt


def _patch(module):
    sys.path.append({root!r})
    from vllm_modelopt_shim import patch

    patch.apply(module)


wrapt.register_post_import_hook(_patch, "vllm.model_executor.models.qwen3_vl_moe")
'''


def wall(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or proc.stderr:
        raise BenchError(f"{' '.join(cmd)} (PYTHONPATH={env.get('PYTHONPATH')}) failed: {proc.stderr.decode()[-2000:]}")
    return elapsed


def startup(python: str, runs: int, naive: bool) -> dict[str, Any]:
    """Median wall time of `python -c pass`: off (no PYTHONPATH), on (the checkout), naive (eager wrapt)."""
    with tempfile.TemporaryDirectory(prefix="shim-bench-naive-") as naive_dir:
        (Path(naive_dir) / "sitecustomize.py").write_text(NAIVE_SITECUSTOMIZE.format(root=str(ROOT)))
        envs = {"off": base_env(), "on": {**base_env(), "PYTHONPATH": str(ROOT)}}
        if naive:
            envs["naive"] = {**base_env(), "PYTHONPATH": naive_dir}
        with tempfile.TemporaryDirectory(prefix="shim-bench-cwd-") as cwd:
            cmd = [python, "-c", "pass"]
            for env in envs.values():  # warm the page cache; not timed
                for _ in range(3):
                    wall(cmd, env, cwd)
            samples: dict[str, list[float]] = {k: [] for k in envs}
            keys = list(envs)
            for i in range(runs):
                for key in keys[i % len(keys) :] + keys[: i % len(keys)]:  # rotate the order every round
                    samples[key].append(wall(cmd, envs[key], cwd))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    out: dict[str, Any] = {
        "python": python,
        "runs": runs,
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "ratio": medians["on"] / medians["off"],
    }
    if naive:
        out["naive_ratio"] = medians["naive"] / medians["off"]
    return out


def has_wrapt(python: str) -> bool:
    proc = subprocess.run([python, "-c", "import wrapt"], env=base_env(), capture_output=True)
    return proc.returncode == 0


# -- doctor ------------------------------------------------------------------------------------------
def doctor(python: str, directory: str, runs: int, expected_tensors: int) -> dict[str, Any]:
    env = {**base_env(), "PYTHONPATH": str(ROOT)}
    cmd = [python, "-m", "vllm_modelopt_shim", "doctor", directory, "--json"]
    samples = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shim-bench-cwd-") as cwd:
        for i in range(runs + 1):  # the first run warms the page cache; not timed
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
            elapsed = time.perf_counter() - started
            if proc.returncode != 0:
                raise BenchError(f"doctor exited {proc.returncode}: {proc.stderr[-2000:]}")
            result = json.loads(proc.stdout)
            if i:
                samples.append(elapsed)
    if (
        result["verdict"] != "needs-shim"
        or result["tensors"] != expected_tensors
        or result["shards"] != workloads.SHARDS
    ):
        raise BenchError(f"unexpected doctor result: { {k: result[k] for k in ('verdict', 'tensors', 'shards')} }")
    return {
        "python": python,
        "runs": runs,
        "seconds": [round(s, 4) for s in samples],
        "median_s": statistics.median(samples),
        "verdict": result["verdict"],
        "tensors": result["tensors"],
        "shards": result["shards"],
    }


# -- loads -------------------------------------------------------------------------------------------
def loads(python: Path, ckpt: dict[str, Any], pairs: int) -> dict[str, Any]:
    """``pairs`` interleaved loads: the shim on legacy names, stock vLLM on the same bytes under canonical names."""
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for i in range(pairs):
        for shim in (True, False) if i % 2 == 0 else (False, True):
            r = measure(python, ["load", ckpt["legacy" if shim else "canonical"]], shim_env() if shim else base_env())
            if r["shim"] != shim:
                raise BenchError(
                    f"the shim is {'off' if shim else 'on'} in a load meant {'with' if shim else 'without'} it"
                )
            if shim and (r["seen"] != ckpt["tensors"] or r["renamed"] != ckpt["expert_tensors"] or r["refused"]):
                raise BenchError(f"the shim saw an unexpected stream: {r}")
            (on if shim else off).append(r)
            log(f"{ckpt['name']} {i + 1}/{pairs} {'shim ' if shim else 'stock'}: load_weights {r['load_s']:.3f} s, "
                f"peak RSS {r['maxrss_mib']:.0f} MiB" + (f", shim {r['shim_s']:.3f} s" if shim else ""))  # fmt: skip
    out = figures.paired(on, off)
    out["versions"] = {k: on[0][k] for k in ("vllm", "torch", "python")}
    return out


# -- convert -----------------------------------------------------------------------------------------
def converts(python: Path, big: dict[str, Any], reps: int) -> dict[str, Any]:
    """``cp -r`` and ``convert`` (byte-exact, and the default) of a real-size checkpoint, interleaved."""
    src = big["legacy"]
    runs: dict[str, list[float]] = {"cp": [], "exact": [], "default": []}
    cmds = {
        "cp": lambda dst: ["cp", "-r", src, dst],
        "exact": lambda dst: [str(python), "-m", "vllm_modelopt_shim", "convert", src, dst, "--no-harmonize"],
        "default": lambda dst: [str(python), "-m", "vllm_modelopt_shim", "convert", src, dst],
    }
    with tempfile.TemporaryDirectory(prefix="shim-bench-convert-", dir=Path(src).parent) as work:
        subprocess.run(cmds["cp"](f"{work}/warm"), check=True)  # the page cache holds SRC from here on
        for i in range(reps):
            for key in list(cmds)[i % 3 :] + list(cmds)[: i % 3]:
                dst = f"{work}/{key}-{i}"
                started = time.perf_counter()
                proc = subprocess.run(cmds[key](dst), env=shim_env(), capture_output=True, text=True)
                runs[key].append(time.perf_counter() - started)
                if proc.returncode != 0:
                    raise BenchError(f"{key} exited {proc.returncode}: {proc.stderr[-2000:]}")
                shutil.rmtree(dst)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "mib": big["bytes"] / 2**20,
        "layers": big["expert_tensors"] // (128 * 3 * 4),
        "cp_s": [round(x, 3) for x in runs["cp"]],
        "exact_s": [round(x, 3) for x in runs["exact"]],
        "default_s": [round(x, 3) for x in runs["default"]],
        "exact_ratio": med["exact"] / med["cp"],
        "default_ratio": med["default"] / med["cp"],
    }


# -- report ------------------------------------------------------------------------------------------
def machine(python: Path, system_python: str | None, versions: dict[str, str]) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0

    def version_of(py: str | Path | None) -> str | None:
        if py is None:
            return None
        out = subprocess.run(
            [str(py), "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True
        )
        return out.stdout.strip() or None

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": nproc,
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "os": platform.platform(),
        "venv_python": str(python),
        "venv_python_version": version_of(python),
        "system_python3": system_python,
        "system_python3_version": version_of(system_python),
        "commit": commit or None,
        "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "omp_wait_policy": base_env()["OMP_WAIT_POLICY"],
        **versions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 5 load pairs, looser targets")
    parser.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--pairs", type=int, help="interleaved load pairs per workload (default 5 quick, 9 full)")
    parser.add_argument("--prepare", action="store_true", help="only write the cached workloads, then exit")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be at least 1")
    try:
        return bench(args)
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    quick = args.quick
    pairs = args.pairs or (5 if quick else 9)
    started = time.monotonic()
    python = vllm_python()
    census, real = prepare(python, "census"), prepare(python, "real")
    big = prepare(python, "convert")  # from real's bytes
    if args.prepare:
        print(census["dir"], real["dir"], big["dir"])
        return 0
    system_python = plain_python3()
    log("start-up: 30 interleaved runs of `python -c pass` per variant")
    su = startup(str(python), 30 if quick else 60, naive=True)
    log("doctor: on the 8-shard census copy")
    dr = doctor(system_python or str(python), census["sharded"], 3 if quick else 5, census["tensors"])
    log("fold: one real-size MoE layer")
    fo = measure(python, ["fold", real["legacy"]], shim_env())
    log("stream: census tensors in memory, three orders")
    st = measure(python, ["stream", census["legacy"]], shim_env())
    log(f"loads: {pairs} interleaved pairs per workload, one subprocess each")
    rl = loads(python, real, pairs)
    ce = loads(python, census, pairs)
    log("convert: 8 real-size MoE layers in 4 shards, against cp -r (last: it writes gigabytes)")
    cv = converts(python, big, 3 if quick else 5)
    result: dict[str, Any] = {
        "startup_ratio": su["ratio"],
        "load_overhead_ratio": ce["ratio"],
        "real_load_ratio": rl["ratio"],
        "fold_s_per_layer": fo["median_s"],
        "interleaved_ratio": st["interleaved_ratio"],
        "extra_rss_mib": ce["extra_rss_mib"],
        "real_extra_rss_mib": rl["extra_rss_mib"],
        "doctor_s": dr["median_s"],
        "convert_exact_ratio": cv["exact_ratio"],
        "convert_ratio": cv["default_ratio"],
        "shim_s_per_census_load": statistics.median(ce["shim_s"]),
        "shim_us_per_tensor": ce["shim_us_per_tensor"],
        "census_own_ratio": ce["own_ratio"],
        "real_own_ratio": rl["own_ratio"],
        "startup_ratio_naive": su.get("naive_ratio"),
        "mode": "quick" if quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine(python, system_python, ce["versions"]),
        "details": {"census": ce, "real": rl, "fold": fo, "stream": st, "startup": su, "doctor": dr, "convert": cv,
                    "workloads": {"census": census, "real": real}},
    }  # fmt: skip
    result["targets"] = {k: figures.target(k, quick) for k in figures.TARGETS}
    result["pass"] = {k: figures.passes(k, result[k], quick) for k in figures.TARGETS}
    result["all_pass"] = all(result["pass"].values())
    result["details"]["wall_s"] = round(time.monotonic() - started, 1)
    print(figures.table(result, quick))
    print(f"(benchmark wall time {result['details']['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
