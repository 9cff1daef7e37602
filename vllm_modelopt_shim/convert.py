"""``convert SRC DST``: write a checkpoint that stock vLLM (and any other loader) reads right, with no shim.

The doctor's path first (the shared ledger and verify: one truth, a third door); then a writer:
each shard's header rewritten with canonical expert names, its data region copied in bulk,
harmonized gate/up scale bytes patched in place; ``config.json`` given the keys every release
reads (values unchanged); every other file copied byte for byte.  Everything is written into a
temporary sibling of DST and renamed at the end, so an interrupted convert leaves no DST.
It never needs torch or vLLM; harmonizing needs numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from . import awq, configfix, doctor, shards
from .errors import CheckpointError
from .names import AWQ_SUFFIX, COMPRESSED, FUSED, MODELOPT, PROJECTIONS, canonical, parse

__all__ = ["Conversion", "UsageError", "convert"]

CONVERTED = "converted"
_COPY_CHUNK = 64 << 20


class UsageError(ValueError):
    """SRC or DST cannot be used as given (exit 2); ``name`` is the path."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class Conversion:
    """What one convert did; ``as_dict`` is the --json object."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst
        self.verdict = CONVERTED
        self.renamed = 0
        self.harmonized = 0
        self.awq: awq.Tally | None = None  # NVFP4_AWQ: the pre_quant_scale folds written
        self.files = 0
        self.bytes = 0
        self.seconds = 0.0
        self.config_fixes: list[str] = []
        self.problems: list[CheckpointError] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "src": str(self.src),
            "dst": str(self.dst),
            "verdict": self.verdict,
            "renamed": self.renamed,
            "harmonized": self.harmonized,
            "awq": self.awq.as_dict() if self.awq is not None else None,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "config_fixes": self.config_fixes,
            "problems": [str(p) for p in self.problems],
            "problem_tensors": [p.name for p in self.problems],
        }


def _say(out: TextIO | None, message: str) -> None:
    if out is not None:
        print(f"[convert] {message}", file=out, flush=True)


def convert(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, harmonize: bool = True, progress: TextIO | None = None
) -> Conversion:
    """Convert SRC into DST (raises UsageError; a checkpoint that cannot load correctly writes nothing)."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise UsageError(str(src), f"{src / 'config.json'} not found: SRC must be a checkpoint directory")
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise UsageError(str(dst), f"{dst} exists and is not an empty directory: choose a new DST")
    if dst.resolve() == src.resolve():
        raise UsageError(str(dst), "DST must differ from SRC (SRC is never touched)")
    result = Conversion(src, dst)
    d = doctor.diagnose(src)
    if (harmonize and d.family in (MODELOPT, COMPRESSED)) or d.awq is not None:
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise UsageError(str(src), "harmonizing and NVFP4_AWQ folding need numpy: install it") from None
    if d.verdict == doctor.CANNOT:
        result.verdict, result.problems = doctor.CANNOT, d.problems
        result.seconds = time.perf_counter() - started
        return result
    tmp = dst.parent / f".{dst.name}.convert-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        good = d.shards_read
        folds = _AwqPlan(good, d, result) if d.awq is not None else None
        rows = folds.rows if folds is not None else None
        harmonizing = (harmonize and d.family in (MODELOPT, COMPRESSED)) or folds is not None
        patches = _harmonize(good, d.family, result, rows) if harmonizing else {}
        if folds is not None:
            for path, found in folds.patches.items():
                patches.setdefault(path, []).extend(found)
        _write(src, tmp, good, d.family, patches, result, progress, folds.drop if folds is not None else frozenset())
        if dst.exists():
            dst.rmdir()  # the empty directory DST may be
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - started
    rate = result.bytes / result.seconds / 2**20 if result.seconds else 0.0
    _say(
        progress,
        f"{dst}: {result.files} files, {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s ({rate:.0f} MiB/s); "
        f"{result.renamed} tensors renamed, {result.harmonized} experts harmonized",
    )
    return result


def _write(
    src: Path,
    tmp: Path,
    good: list[shards.Shard],
    family: str | None,
    patches: dict[Path, list[tuple[int, Any]]],
    result: Conversion,
    progress: TextIO | None,
    drop: frozenset[str] = frozenset(),
) -> None:
    """Each shard: a new header, the data copied in bulk (in runs, around dropped tensors), patches over it."""
    names: dict[str, str] = {}
    done = {s.path for s in good}
    for i, shard in enumerate(good):
        t0 = time.perf_counter()
        entries = []
        moved: dict[int, int] = {}  # a kept tensor's data offset -> its offset in the new shard
        runs: list[tuple[int, int, int]] = []  # (from, to, bytes) of data copied as is
        at = 0
        for name, e in sorted(shard.entries.items(), key=lambda item: item[1].start):
            if name in drop:
                continue
            new = canonical(name, family)
            names[name] = new
            result.renamed += new != name
            entries.append(shards.Entry(new, e.dtype, e.shape, at, at + e.end - e.start))
            moved[e.start] = at
            if runs and runs[-1][0] + runs[-1][2] == e.start and runs[-1][1] + runs[-1][2] == at:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + e.end - e.start)
            else:
                runs.append((e.start, at, e.end - e.start))
            at += e.end - e.start
        out = tmp / shard.path.name
        header = shards.header_bytes(entries, shard.metadata)
        fin, fout = os.open(shard.path, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fout, header)
            for start, to, count in runs:
                _copy(fin, shard.data_start + start, fout, len(header) + to, count)
            for offset, data in patches.get(shard.path, ()):
                os.pwrite(fout, data, len(header) + moved[offset])
        finally:
            os.close(fin)
            os.close(fout)
        result.files += 1
        result.bytes += len(header) + at
        secs = time.perf_counter() - t0
        _say(
            progress,
            f"shard {i + 1}/{len(good)} {shard.path.name}: {shard.size / 2**20:.1f} MiB in {secs:.2f} s "
            f"({shard.size / 2**20 / secs if secs else 0:.0f} MiB/s)",
        )
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or path in done:
            continue
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json"):
            _write_config(path, target, result, nvfp4=bool(drop))
        elif rel == Path("hf_quant_config.json") and drop:
            target.write_text(json.dumps(awq.as_nvfp4(json.loads(path.read_text())), indent=4) + "\n")
        elif rel == Path("model.safetensors.index.json"):
            index = json.loads(path.read_text())
            index["weight_map"] = {
                names[k] if k in names else canonical(k, family): v
                for k, v in index.get("weight_map", {}).items()
                if k not in drop
            }
            target.write_text(json.dumps(index, indent=2) + "\n")
        else:
            shutil.copy2(path, target)  # tokenizer, processor and generation configs, chat template: as they are
        result.files += 1
        result.bytes += target.stat().st_size


def _copy(fin: int, start: int, fout: int, at: int, count: int) -> None:
    """``count`` bytes from ``fin`` at ``start`` to ``fout`` at ``at``: in the kernel where it can (copy_file_range)."""
    copy_range = getattr(os, "copy_file_range", None)
    while count > 0 and copy_range is not None:
        try:
            n = copy_range(fin, fout, min(count, 1 << 30), start, at)
        except OSError:
            break  # another filesystem, say: copy it ourselves
        if n == 0:
            break
        start, at, count = start + n, at + n, count - n
    while count > 0:
        buf = os.pread(fin, min(count, _COPY_CHUNK), start)
        if not buf:
            raise OSError(f"shard shorter than its header says ({count} bytes missing)")
        os.pwrite(fout, buf, at)
        start, at, count = start + len(buf), at + len(buf), count - len(buf)


def _write_config(path: Path, target: Path, result: Conversion, *, nvfp4: bool = False) -> None:
    """config.json with what some transformers generation lacks filled in (and, ``nvfp4``, quant_algo
    NVFP4 for a folded NVFP4_AWQ checkpoint); byte for byte if nothing changes."""
    config = json.loads(path.read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    fills, _ = configfix.plan(text)
    if nvfp4 and isinstance(config.get("quantization_config"), dict):
        config["quantization_config"] = awq.as_nvfp4(config["quantization_config"])
        result.config_fixes.append(f"quantization_config.quant_algo = {awq.NVFP4!r} (pre_quant_scale folded)")
    elif not fills:
        shutil.copy2(path, target)
        return
    for fill in fills:
        text[fill.key] = fill.value
        result.config_fixes.append(fill.describe())
    target.write_text(json.dumps(config, indent=2) + "\n")


def _harmonize(
    good: list[shards.Shard], family: str | None, result: Conversion, rows: dict[tuple[str, int], Any] | None = None
) -> dict[Path, list[tuple[int, Any]]]:
    """The fold of every expert, one MoE layer at a time as the runtime folds, as byte patches: data
    offset -> new bytes, per shard (needs numpy).  ``rows``: down_proj's NVFP4_AWQ p per (layer, expert),
    into up's block-scale rows."""
    import numpy as np

    from .fp8 import fold_many

    block, glob = "weight_scale", "weight_global_scale" if family == COMPRESSED else "weight_scale_2"
    where: dict[tuple[str, int, str, str], tuple[shards.Shard, shards.Entry]] = {}
    for shard in good:
        for name, e in shard.entries.items():
            p = parse(name)
            if p is not None and p.layout != FUSED and p.proj in PROJECTIONS[:2] and p.suffix in (block, glob):
                where[(p.prefix, p.expert, p.proj, p.suffix)] = (shard, e)
    layers: dict[str, list[list[tuple[str, int, str, str]]]] = {}
    for prefix, expert, proj, suffix in where:
        if proj != "gate_proj" or suffix != block:
            continue
        keys = [(prefix, expert, p, s) for p in PROJECTIONS[:2] for s in (block, glob)]
        if not all(k in where for k in keys):
            continue
        (_, gb), (_, gg), (_, ub), (_, ug) = (where[k] for k in keys)
        if gb.dtype != "F8_E4M3" or ub.dtype != "F8_E4M3" or len(gb.shape) != 2 or gb.shape != ub.shape:
            continue
        if gg.dtype != "F32" or ug.dtype != "F32" or gg.end - gg.start != 4 or ug.end - ug.start != 4:
            continue
        layers.setdefault(prefix, []).append(keys)
    fds = {shard.path: os.open(shard.path, os.O_RDONLY) for shard in good}
    try:

        def raw(key: tuple[str, int, str, str]) -> bytes:
            shard, e = where[key]
            return os.pread(fds[shard.path], e.end - e.start, shard.data_start + e.start)

        patches: dict[Path, list[tuple[int, Any]]] = {}
        for batch in layers.values():
            inputs = []
            for keys in batch:
                gate, up = (np.frombuffer(raw(k), np.uint8).reshape(where[k][1].shape) for k in (keys[0], keys[2]))
                g, u = (struct.unpack("<f", raw(k))[0] for k in (keys[1], keys[3]))
                inputs.append((gate, up, g, u))
            down_p = [rows.get(keys[0][:2]) for keys in batch] if rows is not None else None
            for keys, f in zip(batch, fold_many(inputs, reciprocal=family == COMPRESSED, rows=down_p), strict=True):
                if f is None:
                    continue
                result.harmonized += 1
                common = struct.pack("<f", f.common)
                new = (np.ascontiguousarray(f.gate) if f.shift else None, common, np.ascontiguousarray(f.up), common)
                for key, data in zip(keys, new, strict=True):
                    if data is not None:  # gate's block scales change only when shifted
                        shard, e = where[key]
                        patches.setdefault(shard.path, []).append((e.start, data))
    finally:
        for fd in fds.values():
            os.close(fd)
    return patches


class _AwqPlan:
    """An NVFP4_AWQ checkpoint's folds, as the runtime makes them (``awq``'s arithmetic on the same values):
    down's p per expert for ``_harmonize`` (``rows``), byte patches for norms, routers, v's block scales
    and o's global scales, and every pre_quant_scale to leave out (``drop``)."""

    def __init__(self, good: list[shards.Shard], d: doctor.Diagnosis, result: Conversion) -> None:
        self.rows: dict[tuple[str, int], Any] = {}
        self.patches: dict[Path, list[tuple[int, Any]]] = {}
        self.drop: frozenset[str] = frozenset()
        self.where = {name: (shard, e) for shard in good for name, e in shard.entries.items()}
        self.fds = {shard.path: os.open(shard.path, os.O_RDONLY) for shard in good}
        try:
            self._plan(d, result)
        finally:
            for fd in self.fds.values():
                os.close(fd)

    def _raw(self, name: str) -> bytes:
        shard, e = self.where[name]
        return os.pread(self.fds[shard.path], e.end - e.start, shard.data_start + e.start)

    def _patch(self, name: str, data: Any) -> None:
        shard, e = self.where[name]
        self.patches.setdefault(shard.path, []).append((e.start, data))

    def _plan(self, d: doctor.Diagnosis, result: Conversion) -> None:
        import numpy as np

        text = json.loads((d.path / "config.json").read_text())
        text = text.get("text_config", text)
        shapes = awq.Shapes.of(text.get)
        tally = result.awq = awq.Tally()
        layers: dict[str, dict[tuple[str, int], tuple[str, Any]]] = {}
        drop = []
        for name, (_, e) in self.where.items():
            if not name.endswith("." + AWQ_SUFFIX):
                continue
            drop.append(name)
            values = awq.vector(self._raw(name), e.dtype)
            parsed = parse(name)
            if parsed is None:  # o_proj's: into v's block scales, o's global scale takes the power of two
                layer = name[: -len(awq.O_P)]
                v_name, g_name = layer + awq.V_BLOCK, layer + awq.O_GLOBAL
                v = np.frombuffer(self._raw(v_name), np.uint8).reshape(self.where[v_name][1].shape)
                fold = awq.AttentionFold.of(values, v, shapes.heads, shapes.kv_heads)
                tally.add(name, fold.left)
                self._patch(v_name, np.ascontiguousarray(fold.v_codes))
                if fold.shift:
                    glob = struct.unpack("<f", self._raw(g_name))[0]
                    self._patch(g_name, struct.pack("<f", glob * 2.0**fold.shift))
            elif parsed.proj == "down_proj":
                self.rows[(parsed.prefix, parsed.expert)] = values
                tally.add(name, 0.0)
            else:
                layers.setdefault(parsed.prefix[: -len(awq.EXPERTS)], {})[(parsed.proj, parsed.expert)] = (name, values)
        for layer, ps in layers.items():
            mean = awq.common({k: v for k, (_, v) in ps.items()})
            for name, values in ps.values():
                tally.add(name, awq.residual(values, mean))
            for tail, divide in ((awq.NORM, False), (awq.ROUTER, True)):
                dtype = "bfloat16" if self.where[layer + tail][1].dtype == "BF16" else "float32"
                raw = np.frombuffer(self._raw(layer + tail), "<u2" if dtype == "bfloat16" else "<f4")
                shape = self.where[layer + tail][1].shape
                x = awq.from_bits(raw, dtype).reshape(shape)
                self._patch(layer + tail, awq.to_bits(awq.scale_columns(x, mean, divide=divide), dtype).tobytes())
        self.drop = frozenset(drop)


def main_convert(args: Any) -> int:
    """The command: exit 0 written, 1 cannot be converted correctly (nothing written), 2 usage."""
    try:
        result = convert(args.src, args.dst, harmonize=not args.no_harmonize, progress=sys.stderr)
    except (UsageError, OSError, ValueError) as exc:  # diagnose: no config, no shards; and usage
        print(f"vllm-modelopt-shim convert: {exc}", file=sys.stderr)
        if args.json:  # still exactly one object on stdout
            print(
                json.dumps({"src": str(args.src), "dst": str(args.dst), "verdict": None, "error": str(exc)}, indent=2)
            )
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    elif result.verdict == doctor.CANNOT:
        print(f"{result.src}: {doctor.CANNOT}; nothing written", file=sys.stderr)
        for p in result.problems:
            print(f"  - {p}", file=sys.stderr)
    return 1 if result.verdict == doctor.CANNOT else 0
