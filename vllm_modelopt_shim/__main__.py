"""Command line: doctor DIR | status | convert SRC DST.

From a checkout (on PYTHONPATH, or as the working directory): python3 -m vllm_modelopt_shim ...;
after pip install: vllm-modelopt-shim ...  Run status with the python that runs vLLM.
Exit status: 0 loadable (doctor), written (convert) or printed (status); 1 cannot-load-correctly;
2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


#: the console script a pip install puts on PATH
SCRIPT = "vllm-modelopt-shim"


def _prog() -> str:
    """How this command was run: the console script, or ``python3 -m`` from a checkout (which has no script)."""
    return SCRIPT if os.path.basename(sys.argv[0] or "") == SCRIPT else "python3 -m vllm_modelopt_shim"


def _doctor(args: argparse.Namespace, prog: str) -> int:
    from .doctor import CANNOT, diagnose, render

    try:
        d = diagnose(args.dir)
    except (OSError, ValueError) as exc:
        print(f"vllm-modelopt-shim doctor: {exc}", file=sys.stderr)
        if args.json:  # still exactly one object on stdout
            print(json.dumps({"path": str(args.dir), "verdict": None, "error": str(exc)}, indent=2))
        return 2
    d.convert_command = f"{prog} convert"
    print(json.dumps(d.as_dict(), indent=2) if args.json else render(d))
    return 1 if d.verdict == CANNOT else 0


#: the lowest wrapt the patch is written for (pyproject.toml says the same)
WRAPT_MIN = (2, 4)


def _armed() -> tuple[str, str | None]:
    """How the shim is armed in this environment, and a hint where it is not."""
    import importlib.util
    from importlib.metadata import entry_points

    from . import _bootstrap

    doorbell = sys.modules.get("sitecustomize")
    if getattr(doorbell, "vllm_modelopt_shim_rang", False):
        how = f"sitecustomize.py on PYTHONPATH ({getattr(doorbell, '__file__', '?')})"
        return how + ("" if _bootstrap.installed() else "; its hook has already fired"), None
    plugins = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("vllm_modelopt_shim")]
    if plugins:
        return "vllm.general_plugins entry point (pip install): vLLM arms it when it loads its plugins", None
    here = importlib.util.find_spec("vllm_modelopt_shim")
    root = os.path.dirname(os.path.dirname(here.origin or "")) if here else ""
    hint = (
        f"put the checkout on PYTHONPATH (PYTHONPATH={root}) or `pip install {root}`"
        if os.path.isfile(os.path.join(root, "sitecustomize.py"))
        else "put the checkout on PYTHONPATH, or pip install it"
    )
    return "neither (no sitecustomize.py on PYTHONPATH, no entry point installed)", hint


def _wrapt_line() -> str:
    try:
        import wrapt
    except ImportError:
        return "wrapt: NOT importable (pip install 'wrapt>=2.4'): the patch cannot be applied"
    version = str(getattr(wrapt, "__version__", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < WRAPT_MIN:
        return f"wrapt: {version} is TOO OLD (the shim needs >= 2.4: pip install -U 'wrapt>=2.4')"
    return f"wrapt: {version}"


def status_lines() -> list[str]:
    """What the shim does in this interpreter, and why."""
    from . import _bootstrap, patch, settings

    s = settings.load()
    enabled = "on" if s.enabled else "off"
    why = f"{settings.ENABLE}={os.environ[settings.ENABLE]!r}" if os.environ.get(settings.ENABLE) else "default"
    armed, hint = _armed()
    lines = [
        f"shim: {enabled} ({why})",
        f"armed by: {armed}" if s.enabled else f"armed by: nothing ({settings.ENABLE} is off: vLLM runs stock)",
    ]
    if hint and s.enabled:
        lines.append(f"  hint: {hint}")
    lines.append(
        f"settings: verify={s.verify} harmonize={'on' if s.harmonize else 'off'} awq={s.awq} "
        f"report={s.report_dir or 'unset'}"
    )
    lines.append(_wrapt_line())
    version = patch.vllm_version()
    if version == "unknown":
        lines.append(
            f"vLLM: not installed in this interpreter ({sys.executable}): run status with the python that runs vLLM"
        )
        return lines
    lines.append(
        f"vLLM: {version} (tested {'.'.join(map(str, patch.TESTED[0]))} to {'.'.join(map(str, patch.TESTED[1]))})"
    )
    try:
        import importlib

        if s.enabled and not _bootstrap.installed() and hint is None and _bootstrap.TARGET not in sys.modules:
            _bootstrap.install()  # what vLLM's plugin loading does in its processes
        module = importlib.import_module(_bootstrap.TARGET)  # the hook, if armed, patches it now
    except Exception as exc:
        lines.append(f"patch target: {_bootstrap.TARGET} cannot be imported ({type(exc).__name__}: {exc})")
        return lines
    found = patch.target_class(module) is not None
    lines.append(f"patch target: {_bootstrap.TARGET}.{patch.CLASS}.load_weights {'found' if found else 'NOT found'}")
    reason = patch.reason()
    if not patch.is_applied() and reason == "not yet imported":
        reason = f"{settings.ENABLE} is off" if not s.enabled else "no hook is armed in this interpreter"
    lines.append(f"patch applied: {patch.is_applied()} ({reason})")
    return lines


def main(argv: list[str] | None = None) -> int:
    prog = _prog()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="will this checkpoint load correctly? (config and headers only)")
    doc.add_argument("dir", help="checkpoint directory (config.json, *.safetensors)")
    doc.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    sub.add_parser(
        "status",
        help="what the shim does in this interpreter (run it with the python that runs vLLM)",
        description="What the shim does in this interpreter: run it with the python that runs vLLM.",
    )
    conv = sub.add_parser(
        "convert",
        help="write a copy of a checkpoint that stock vLLM loads correctly",
        description=(
            "Write a copy of SRC that stock vLLM loads correctly: canonical expert names, and by default "
            "harmonized gate/up global scales, which needs numpy. An NVFP4_AWQ SRC becomes plain NVFP4, its "
            "pre_quant_scale folded as the shim folds it while loading (needs numpy). --no-harmonize copies "
            "every tensor byte-exact and needs nothing beyond Python (no numpy, no torch, no vLLM)."
        ),
    )
    conv.add_argument("src", help="checkpoint directory")
    conv.add_argument("dst", help="new directory (must not exist, or be empty)")
    conv.add_argument(
        "--no-harmonize",
        action="store_true",
        help="every tensor byte-exact; needs nothing beyond Python (the default, harmonized, needs numpy)",
    )
    conv.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return _doctor(args, prog)
    if args.command == "convert":
        from .convert import main_convert

        return main_convert(args)
    print("\n".join(status_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
