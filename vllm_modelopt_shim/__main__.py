"""Command line: ``python -m vllm_modelopt_shim doctor DIR [--json]`` and ``... status``.

Exit status: 0 loadable (doctor) or printed (status); 1 cannot-load-correctly; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import CANNOT, diagnose, render

    try:
        d = diagnose(args.dir)
    except (OSError, ValueError) as exc:
        print(f"vllm-modelopt-shim doctor: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(d.as_dict(), indent=2) if args.json else render(d))
    return 1 if d.verdict == CANNOT else 0


def status_lines() -> list[str]:
    """What the shim does in this interpreter, and why."""
    from . import _bootstrap, patch, settings

    s = settings.load()
    enabled = "on" if s.enabled else "off"
    why = f"{settings.ENABLE}={os.environ[settings.ENABLE]!r}" if os.environ.get(settings.ENABLE) else "default"
    lines = [
        f"shim: {enabled} ({why}); import hook armed: {_bootstrap.installed() or patch.is_applied()}",
        f"settings: verify={s.verify} harmonize={'on' if s.harmonize else 'off'} report={s.report_dir or 'unset'}",
    ]
    try:
        import wrapt

        lines.append(f"wrapt: {getattr(wrapt, '__version__', 'installed')}")
    except ImportError:
        lines.append("wrapt: NOT importable (pip install wrapt): the patch cannot be applied")
    version = patch.vllm_version()
    if version == "unknown":
        lines.append("vLLM: not installed in this interpreter")
        return lines
    lines.append(
        f"vLLM: {version} (tested {'.'.join(map(str, patch.TESTED[0]))} to {'.'.join(map(str, patch.TESTED[1]))})"
    )
    try:
        import importlib

        module = importlib.import_module(_bootstrap.TARGET)  # the hook, if armed, patches it now
    except Exception as exc:
        lines.append(f"patch target: {_bootstrap.TARGET} cannot be imported ({type(exc).__name__}: {exc})")
        return lines
    found = patch.target_class(module) is not None
    lines.append(f"patch target: {_bootstrap.TARGET}.{patch.CLASS}.load_weights {'found' if found else 'NOT found'}")
    lines.append(f"patch applied: {patch.is_applied()} ({patch.reason()})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_modelopt_shim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="will this checkpoint load correctly? (config and headers only)")
    doc.add_argument("dir", help="checkpoint directory (config.json, *.safetensors)")
    doc.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    sub.add_parser("status", help="what the shim does in this interpreter")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    print("\n".join(status_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
