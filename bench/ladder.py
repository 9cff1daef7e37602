"""Where a load's overhead comes from: the shim's layers added one at a time, against stock.

    python3 bench/ladder.py [--reps 5] [--json bench/out/ladder.json]    # ~3 min per rep here
    python3 bench/ladder.py --against b975a2c --only stock defaults     # a change, with and without
    python3 bench/ladder.py --workload real --against b975a2c --only stock defaults   # at real size

Four variants of the census load (``--workload real``: the real-size one; bench/workloads.py), one
fresh interpreter each, rotated every rep: stock vLLM; a pass-through generator at the shim's hook
point (bench/passthrough); the shim with verification and harmonization off on canonical names
(parse, rename, record: the stream alone); the shim's defaults on legacy names (what users run).
Per variant, the median of the ratios paired with the stock load of the same rep, the shim's own
seconds, and Python's garbage collections during the load.  ``--against REV`` adds the defaults of
the package at git revision REV (exported to a temporary directory): a change measured with and
without it in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402


def variants(against: tuple[str, Path] | None = None) -> dict[str, tuple[dict[str, str], str, tuple[bool, bool]]]:
    """name -> (environment, checkpoint layout, (shim armed, pass-through armed) as the load must report)."""
    bare = {"VLLM_MODELOPT_SHIM_VERIFY": "off", "VLLM_MODELOPT_SHIM_HARMONIZE": "0"}
    extra: dict[str, tuple[dict[str, str], str, tuple[bool, bool]]] = {}
    if against is not None:  # (revision, the directory it was exported to)
        extra[f"defaults at {against[0]}"] = (
            {**run.base_env(), "PYTHONPATH": str(against[1])},
            "legacy",
            (True, False),
        )
    return {
        "stock": (run.base_env(), "canonical", (False, False)),
        "pass-through": ({**run.base_env(), "PYTHONPATH": str(HERE / "passthrough")}, "canonical", (False, True)),
        "stream alone": ({**run.shim_env(), **bare}, "canonical", (True, False)),
        "defaults": (run.shim_env(), "legacy", (True, False)),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--against", metavar="REV", help="also the defaults of the package at this git revision")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="these variants (and --against's) only")
    parser.add_argument("--workload", choices=["census", "real"], default="census")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shim-ladder-") as tmp:
        against = None
        if args.against:  # the revision's sitecustomize and package, as a checkout on PYTHONPATH would have them
            archive = subprocess.run(["git", "-C", str(run.ROOT), "archive", args.against, "sitecustomize.py",
                                      "vllm_modelopt_shim"], check=True, capture_output=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            against = (args.against, Path(tmp))
        return ladder(args, variants(against))


def ladder(args: argparse.Namespace, table: dict[str, tuple[dict[str, str], str, tuple[bool, bool]]]) -> int:
    python = run.vllm_python()
    workload = run.prepare(python, args.workload)
    names = [n for n in table if not args.only or n in args.only or n.startswith("defaults at ")]
    if "stock" not in names:
        raise run.BenchError("every ratio is paired with a stock load: keep 'stock' in --only")
    loads: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            env, layout, armed = table[name]
            r = run.measure(python, ["load", workload[layout]], env)
            if (r["shim"], r["passthrough"]) != armed:
                raise run.BenchError(f"{name}: the load reports shim={r['shim']}, pass-through={r['passthrough']}")
            loads[name].append(r)
            run.log(f"{rep + 1}/{args.reps} {name}: load_weights {r['load_s']:.2f} s, shim {r.get('shim_s', 0):.2f} s, "
                    f"collections {r['gc_collections']} in {r['gc_s']:.2f} s")  # fmt: skip
    stock = [r["load_s"] for r in loads["stock"]]
    out: dict[str, Any] = {}
    for name in names:
        rs = loads[name]
        out[name] = {
            "ratio": statistics.median(r["load_s"] / s for r, s in zip(rs, stock, strict=True)),
            "load_s": statistics.median(r["load_s"] for r in rs),
            "shim_s": statistics.median(r.get("shim_s", 0.0) for r in rs),
            "gc_s": statistics.median(r["gc_s"] for r in rs),
            "gc_collections": [statistics.median(r["gc_collections"][g] for r in rs) for g in range(3)],
            "loads": rs,
        }
        o = out[name]
        print(f"{name:24s} ratio {o['ratio']:.3f}  load {o['load_s']:.2f} s  shim {o['shim_s']:.2f} s  "
              f"collections {o['gc_collections']} in {o['gc_s']:.2f} s")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
