"""Will this checkpoint load correctly?  Answered from config files and safetensors headers alone.

No torch, no vLLM: the headers go through the same ``stream.rewrite`` -> ``Ledger`` -> ``verify``
as a real load, so the doctor and the runtime cannot disagree.  The only tensor data read are the
per-expert scalar scales (a 30B-A3B checkpoint has 36,864), through mmap at their header offsets.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import awq, configfix, shards, verify
from .errors import CheckpointError, DamagedShardError
from .ledger import Ledger
from .names import AWQ_SUFFIX, COMPRESSED, MODELOPT, UNQUANTIZED, family_of, parse
from .stream import rewrite

__all__ = ["CANNOT", "NEEDS_SHIM", "STOCK", "Diagnosis", "diagnose", "read_headers", "shard_paths"]

CANNOT = "cannot-load-correctly"
NEEDS_SHIM = "needs-shim"
STOCK = "loads-with-stock-vllm"

_SCALAR_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e"}
#: a gate/up global-scale ratio beyond this is reported (fp8 rounding alone is ~6%)
MISMATCH_REPORTED = 1.001


class Diagnosis:
    """Everything the doctor found; ``as_dict`` is the --json object."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.quantization = "none"
        self.family: str | None = UNQUANTIZED
        self.num_experts: int | None = None
        self.ledger: Ledger | None = None
        self.problems: list[CheckpointError] = []
        self.warnings: list[str] = []
        self.config_fixes: list[str] = []
        self.shards = 0
        self.shards_read: list[shards.Shard] = []  # the checked headers, for convert
        self.worst_scale_ratio = 1.0
        self.mismatched_experts = 0
        self.awq: awq.Tally | None = None  # an NVFP4_AWQ checkpoint: what folding its p will leave
        #: how the advice spells the convert command (the command line sets the form it was run as)
        self.convert_command = "vllm-modelopt-shim convert"

    @property
    def renames(self) -> int:
        return self.ledger.renamed if self.ledger else 0

    @property
    def verdict(self) -> str:
        if self.problems:
            return CANNOT
        return NEEDS_SHIM if self.renames or self.config_fixes or self.awq is not None else STOCK

    @property
    def advice(self) -> str:
        """What to do, in one sentence: the verdict alone can read as a contradiction of a warning."""
        if self.verdict == CANNOT:
            return "fix the problems below, then run the doctor again"
        if self.awq is not None:
            worst = f"worst residual {100 * self.awq.worst:.1f}%" if self.awq.residual else "no residual"
            return (
                f"NVFP4_AWQ, which no vLLM release serves: serve it with the shim, which folds its "
                f"{self.awq.exact + self.awq.residual} pre_quant_scale tensors ({worst}), or write a plain NVFP4 "
                f"copy stock vLLM loads with `{self.convert_command}`"
            )
        if self.mismatched_experts:
            return (
                f"stock vLLM loads it, but dequantizes up_proj of {self.mismatched_experts} experts with gate's "
                "scale: for accurate weights serve it with the shim, or write a harmonized copy with "
                f"`{self.convert_command}`"
                if self.verdict == STOCK
                else f"serve it with the shim, or write a copy stock vLLM loads with `{self.convert_command}`"
            )
        if self.verdict == STOCK:
            return "stock vLLM loads it as it is"
        return f"serve it with the shim, or write a copy stock vLLM loads with `{self.convert_command}`"

    def as_dict(self) -> dict[str, Any]:
        ledger = self.ledger
        return {
            "path": str(self.path),
            "verdict": self.verdict,
            "quantization": self.quantization,
            "num_experts": self.num_experts,
            "shards": self.shards,
            "tensors": ledger.seen if ledger else 0,
            "renames": self.renames,
            "layouts": dict(ledger.layouts) if ledger else {},
            "moe_layers": len(ledger.layers) if ledger else 0,
            "experts_complete": ledger.complete_experts() if ledger else 0,
            "config_fixes": self.config_fixes,
            "gate_up_scale_mismatch": {
                "experts": self.mismatched_experts,
                "worst_ratio": round(self.worst_scale_ratio, 6),
            },
            "awq": self.awq.as_dict() if self.awq is not None else None,
            "advice": self.advice,
            "problems": [str(p) for p in self.problems],
            "problem_tensors": [p.name for p in self.problems],
            "warnings": self.warnings,
        }


def _quantization(config: Mapping[str, Any], hf_quant: Mapping[str, Any] | None) -> tuple[str, str | None]:
    q = config.get("quantization_config")
    if isinstance(q, Mapping) and q.get("quant_method"):
        method = str(q["quant_method"])
        algo = str(q.get("quant_algo") or q.get("format") or "").upper()
    elif hf_quant and isinstance(hf_quant.get("quantization"), Mapping):
        method = "modelopt" if (hf_quant.get("producer") or {}).get("name") == "modelopt" else "unknown"
        algo = str(hf_quant["quantization"].get("quant_algo") or "").upper()
    else:
        return "none", UNQUANTIZED
    family = family_of(method)
    label = {MODELOPT: "ModelOpt", COMPRESSED: "compressed-tensors"}.get(family or "", method)
    return f"{label} {algo}".strip(), family


def shard_paths(path: Path) -> tuple[list[Path], list[CheckpointError]]:
    """The shards in vLLM's order (the index's, else every *.safetensors); shards the index lists but lacks."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors")), []
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except ValueError as exc:
        return [], [DamagedShardError(str(index), f"{index} is not valid JSON ({exc}): copy it again")]
    listed = sorted(path / f for f in set(weight_map.values()))
    missing: list[CheckpointError] = [
        DamagedShardError(str(p), f"{p} is listed in {index.name} but missing: copy every shard of the export")
        for p in listed
        if not p.is_file()
    ]
    return [p for p in listed if p.is_file()], missing


def read_headers(
    path: Path, problems: list[CheckpointError]
) -> tuple[list[shards.Shard], Iterator[tuple[str, tuple[Path, str, list[int], int]]]]:
    """Checked shards in vLLM's order, and (name, (shard, dtype, shape, data offset)) in vLLM's order.

    A damaged or missing shard is added to ``problems`` (naming the file) and skipped.
    """
    paths, missing = shard_paths(path)
    problems.extend(missing)
    good = []
    for p in paths:
        try:
            good.append(shards.read(p))
        except DamagedShardError as exc:
            problems.append(exc)

    def entries() -> Iterator[tuple[str, tuple[Path, str, list[int], int]]]:
        for shard in good:
            for name in sorted(shard.entries):
                e = shard.entries[name]
                yield name, (shard.path, e.dtype, e.shape, shard.data_start + e.start)

    return good, entries()


class _Scalars:
    """Reads one-element tensors straight from the mapped shards (no torch)."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def __call__(self, entry: tuple[Path, str, list[int], int]) -> float:
        shard, dtype, shape, offset = entry
        if math.prod(shape) != 1:
            return math.nan  # a per-tensor scale that is not one value cannot be used as one
        buf = self._maps.get(shard)
        if buf is None:
            with open(shard, "rb") as f:
                buf = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if dtype == "BF16":
            return float(struct.unpack_from("<f", b"\0\0" + buf[offset : offset + 2])[0])
        fmt = _SCALAR_FORMATS.get(dtype)
        return float(struct.unpack_from(fmt, buf, offset)[0]) if fmt else math.nan

    def close(self) -> None:
        for m in self._maps.values():
            m.close()


#: what a checkpoint directory holds, for messages
_EXPECTED = "config.json and *.safetensors"


def _checkpoint_dir(root: Path) -> Path:
    """``root/config.json``; an OSError naming ``root`` itself when it is not a checkpoint directory."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory (expected a checkpoint directory: {_EXPECTED})")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory (expected a checkpoint directory: {_EXPECTED})")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} has no config.json: not a checkpoint directory ({_EXPECTED})")
    return config_file


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object; a ValueError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def diagnose(path: str | os.PathLike[str]) -> Diagnosis:
    """Diagnose a checkpoint directory (raises OSError / ValueError, naming the path, for unusable input)."""
    root = Path(path)
    config = _json_object(_checkpoint_dir(root))
    hf_quant_file = root / "hf_quant_config.json"
    hf_quant = _json_object(hf_quant_file) if hf_quant_file.is_file() else None
    d = Diagnosis(root)
    d.quantization, d.family = _quantization(config, hf_quant)
    text_config = config.get("text_config")
    text: Mapping[str, Any] = text_config if isinstance(text_config, Mapping) else config
    experts = text.get("num_experts", text.get("num_local_experts"))
    d.num_experts = experts if isinstance(experts, int) else None

    fills, conflicts = configfix.plan(text)
    d.config_fixes = [f.describe() for f in fills]
    d.problems.extend(conflicts)

    good, entries = read_headers(root, d.problems)
    d.shards_read = good
    d.shards = len(good) + sum(isinstance(p, DamagedShardError) for p in d.problems)
    if not d.shards:
        raise ValueError(f"{root} holds no *.safetensors: not a checkpoint directory ({_EXPECTED})")
    ledger = d.ledger = Ledger(d.family, d.num_experts, full=True)
    ledger.awq = d.family == MODELOPT and (
        awq.is_awq_config(config.get("quantization_config")) or awq.is_awq_config(hf_quant)
    )
    scalars = _Scalars()
    try:
        for _ in rewrite(entries, ledger, scalar=scalars, on_problem=d.problems.append):
            pass
    finally:
        scalars.close()
    d.problems.extend(verify.check_complete(ledger))
    _scale_mismatch(d, ledger)
    if ledger.awq:
        d.awq = _awq(d, good, awq.Shapes.of(text.get))
    return d


def _awq(d: Diagnosis, good: list[shards.Shard], shapes: awq.Shapes) -> awq.Tally:
    """Every pre_quant_scale read and checked as the runtime will, and what its folds will leave."""
    tally = awq.Tally()
    names = {name for shard in good for name in shard.entries}
    layers: dict[str, dict[tuple[str, int], Any]] = {}
    for shard in good:
        with open(shard.path, "rb") as f:
            for name, e in shard.entries.items():
                if not name.endswith("." + AWQ_SUFFIX):
                    continue
                parsed = parse(name)
                proj = parsed.proj if parsed is not None else "o_proj" if name.endswith(awq.O_P) else None
                if proj is None:
                    continue  # verify refused it already
                values = awq.vector(os.pread(f.fileno(), e.end - e.start, shard.data_start + e.start), e.dtype)
                problem = awq.check(name, proj, values, shapes.length(proj))
                if problem is not None:
                    d.problems.append(problem)
                elif parsed is None:
                    layer = name[: -len(awq.O_P)]
                    needs = [layer + t for t in (awq.V_BLOCK, awq.O_GLOBAL) if layer + t not in names]
                    d.problems.extend(awq.needed(n, name) for n in needs)
                    if shapes.heads and shapes.kv_heads:
                        tally.add(name, awq.group_residual(values, shapes.heads, shapes.kv_heads))
                elif proj == "down_proj":
                    tally.add(name, 0.0)
                else:
                    layers.setdefault(parsed.prefix[: -len(awq.EXPERTS)], {})[(proj, parsed.expert)] = (name, values)
    for layer, ps in layers.items():
        needs = [layer + t for t in (awq.NORM, awq.ROUTER) if layer + t not in names]
        d.problems.extend(awq.needed(n, next(iter(ps.values()))[0]) for n in needs)
        mean = awq.common({k: v for k, (_, v) in ps.items()})
        for name, values in ps.values():
            tally.add(name, awq.residual(values, mean))
    return tally


def _scale_mismatch(d: Diagnosis, ledger: Ledger) -> None:
    suffix = "weight_global_scale" if d.family == COMPRESSED else "weight_scale_2"
    for prefix in ledger.layers:
        for expert in range(ledger.expected_experts()):
            gate = ledger.scalar(prefix, expert, "gate_proj", suffix)
            up = ledger.scalar(prefix, expert, "up_proj", suffix)
            if gate is None or up is None or not (verify.usable_scale(gate) and verify.usable_scale(up)):
                continue
            ratio = max(gate / up, up / gate)
            if ratio > MISMATCH_REPORTED:
                d.mismatched_experts += 1
                d.worst_scale_ratio = max(d.worst_scale_ratio, ratio)
    if d.mismatched_experts:
        d.warnings.append(
            f"{d.mismatched_experts} experts have gate/up global scales apart (worst ratio "
            f"{d.worst_scale_ratio:.3f}): vLLM dequantizes up_proj with gate's scale, up to "
            f"{100 * (d.worst_scale_ratio - 1):.1f}% off; the shim harmonizes them (VLLM_MODELOPT_SHIM_HARMONIZE)"
        )


def _awq_row(t: awq.Tally) -> str:
    worst = f"; worst residual {100 * t.worst:.1f}% ({t.where})" if t.residual else ""
    return f"{t.exact + t.residual} to fold, {t.exact} exactly, {t.residual} with a residual{worst}"


def render(d: Diagnosis) -> str:
    """The human-readable table."""
    data = d.as_dict()
    rows = [
        ("checkpoint", data["path"]),
        ("verdict", f"{data['verdict']}: {data['advice']}"),
        ("quantization", data["quantization"]),
        ("experts per layer", str(data["num_experts"])),
        ("shards / tensors", f"{data['shards']} / {data['tensors']}"),
        ("expert layouts", ", ".join(f"{k} ({v})" for k, v in data["layouts"].items()) or "none"),
        ("MoE layers / complete experts", f"{data['moe_layers']} / {data['experts_complete']}"),
        ("tensors the shim renames", str(data["renames"])),
        ("config fixes", "; ".join(data["config_fixes"]) or "none"),
    ]
    if d.awq is not None:
        rows.append(("NVFP4_AWQ pre_quant_scale", _awq_row(d.awq)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for title, items in (("problems", data["problems"]), ("warnings", data["warnings"])):
        lines.append(f"{title} ({len(items)}):" if items else f"{title}: none")
        lines.extend(f"  - {item}" for item in items)
    return "\n".join(lines)
