"""The demo: a tiny ModelOpt-layout NVFP4 Qwen3-VL-MoE checkpoint through real vLLM 0.32.0 on CPU.

    python3 scripts/demo.py [--vllm VERSION] [--keep DIR]

Sets up the cached venv if needed (scripts/venv.py), writes the checkpoint (names, dtypes and
config exactly as ModelOpt + transformers 4.57 write them), then loads it twice with vLLM's own
loader: shim off (stock vLLM's error) and shim on (every expert compared with the file's bytes).
The shim's load runs with VLLM_MODELOPT_SHIM_HARMONIZE=0 (byte-exact loading), so that every
parameter can be compared with the checkpoint's bytes; the shim's default also harmonizes gate/up
global scales, which changes those scale bytes on purpose (README.md, "Harmonization").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import venv as venvs

ROOT = Path(__file__).resolve().parent.parent
#: the shim's load is byte-exact, so that every parameter can be compared with the checkpoint's bytes
EXACT = {"VLLM_MODELOPT_SHIM_HARMONIZE": "0"}


def load(python: Path, ckpt: Path, shim: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODELOPT_SHIM")}
    env.update(PYTHONPATH=str(ROOT), VLLM_MODELOPT_SHIM=shim, **EXACT)
    proc = subprocess.run(
        [str(python), str(ROOT / "tests" / "harness.py"), str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ckpt.parent,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("HARNESS ")), None)
    if line is None:
        sys.exit(f"demo: the vLLM process failed:\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(line[len("HARNESS ") :])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", default=venvs.DEFAULT_VERSION, metavar="VERSION")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args(argv)
    python = venvs.ensure(args.vllm)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vllm-modelopt-shim-demo-"))
    try:
        return _demo(python, work / "qwen3-vl-moe-tiny-nvfp4-modelopt", args.vllm)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)  # the demo leaves nothing behind unless --keep


def _demo(python: Path, ckpt: Path, vllm: str) -> int:
    tests = str(ROOT / "tests")
    write = (
        f"import sys, pathlib; sys.path.insert(0, {tests!r}); import checkpoints; "
        f"checkpoints.write(pathlib.Path({str(ckpt)!r}))"
    )
    subprocess.run([str(python), "-c", write], check=True)
    print(f"checkpoint: {ckpt}")
    print("  e.g. model.language_model.layers.0.mlp.experts.gate_proj.0.", end="")
    print("{weight, weight_scale, weight_scale_2, input_scale}")

    print(f"\n[1/2] stock vLLM {vllm} (VLLM_MODELOPT_SHIM=0) ...", flush=True)
    off = load(python, ckpt, "0")
    print(f"  {off.get('error')}: {str(off.get('message'))[:240]}")

    print(f"\n[2/2] vLLM {vllm} with the shim (PYTHONPATH={ROOT}, VLLM_MODELOPT_SHIM_HARMONIZE=0) ...")
    print("  harmonization is off here so that every parameter can be compared with the checkpoint's bytes;")
    print("  by default the shim also gives gate/up of each expert one global scale (README: Harmonization)")
    sys.stdout.flush()
    on = load(python, ckpt, "1")
    for line in on.get("shim_log", []):  # type: ignore[union-attr]
        print(f"  {line}")
    ok = on.get("stage") == "loaded" and not on.get("mismatched") and not on.get("unwritten")
    mismatched, unwritten = on.get("mismatched") or [], on.get("unwritten") or []
    print(f"  expert parameters compared with the checkpoint bytes: {on.get('checked')}, ", end="")
    print(f"mismatched: {len(mismatched)}, parameters never written: {len(unwritten)}")  # type: ignore[arg-type]
    dequant = on.get("dequant")
    if isinstance(dequant, dict) and dequant.get("up"):
        print(f"  up_proj as vLLM dequantizes it (with gate's global scale): up to {100 * dequant['up']:.1f}% off")
        print("  (relative L2); the default load harmonizes the two scales, leaving fp8 rounding")
    print(
        "\nresult: "
        + (
            "stock vLLM fails; with the shim (harmonization off) every tensor loads byte-exact"
            if ok and off.get("error")
            else "UNEXPECTED"
        )
    )
    return 0 if ok and off.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
