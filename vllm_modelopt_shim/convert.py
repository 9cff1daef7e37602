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

from . import configfix, doctor, shards
from .errors import CheckpointError
from .names import COMPRESSED, FUSED, MODELOPT, PROJECTIONS, canonical, parse

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
    if harmonize and d.family in (MODELOPT, COMPRESSED):
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise UsageError(str(src), "harmonizing needs numpy: install it, or pass --no-harmonize") from None
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
        patches = _harmonize(good, d.family, result) if harmonize and d.family in (MODELOPT, COMPRESSED) else {}
        _write(src, tmp, good, d.family, patches, result, progress)
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
) -> None:
    names: dict[str, str] = {}
    done = {s.path for s in good}
    for i, shard in enumerate(good):
        t0 = time.perf_counter()
        entries = []
        for name, e in shard.entries.items():
            new = canonical(name, family)
            names[name] = new
            result.renamed += new != name
            entries.append(shards.Entry(new, e.dtype, e.shape, e.start, e.end))
        out = tmp / shard.path.name
        header = shards.header_bytes(entries, shard.metadata)
        fin, fout = os.open(shard.path, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fout, header)
            _copy(fin, shard.data_start, fout, len(header), shard.size - shard.data_start)
            for offset, data in patches.get(shard.path, ()):
                os.pwrite(fout, data, len(header) + offset)
        finally:
            os.close(fin)
            os.close(fout)
        result.files += 1
        result.bytes += len(header) + shard.size - shard.data_start
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
            _write_config(path, target, result)
        elif rel == Path("model.safetensors.index.json"):
            index = json.loads(path.read_text())
            index["weight_map"] = {
                names[k] if k in names else canonical(k, family): v for k, v in index.get("weight_map", {}).items()
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


def _write_config(path: Path, target: Path, result: Conversion) -> None:
    """config.json with what some transformers generation lacks filled in; byte for byte if nothing is."""
    config = json.loads(path.read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    fills, _ = configfix.plan(text)
    if not fills:
        shutil.copy2(path, target)
        return
    for fill in fills:
        text[fill.key] = fill.value
        result.config_fixes.append(fill.describe())
    target.write_text(json.dumps(config, indent=2) + "\n")


def _harmonize(good: list[shards.Shard], family: str | None, result: Conversion) -> dict[Path, list[tuple[int, Any]]]:
    """The fold of every expert, one MoE layer at a time as the runtime folds, as byte patches: data
    offset -> new bytes, per shard (needs numpy)."""
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
            for keys, f in zip(batch, fold_many(inputs, reciprocal=family == COMPRESSED), strict=True):
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
