"""safetensors files, stdlib only: headers read and checked as safetensors itself checks them, and written.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype,
shape, data_offsets relative to the data region; optional ``__metadata__``), then the data region,
which the tensors must cover exactly, in order, without gaps.  ``read`` refuses anything else with
a ``DamagedShardError`` naming the file and what is wrong, reading at most the header itself (never
more than safetensors' 100 MB header limit, never more than the file holds).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import DamagedShardError

__all__ = ["BITS", "MAX_HEADER", "Entry", "Shard", "header_bytes", "read"]

#: safetensors' own limit on the JSON header
MAX_HEADER = 100_000_000
#: dtype -> bits per element, as safetensors names them
BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(slots=True)
class Entry:
    """One tensor of a shard: ``start``/``end`` are byte offsets into the data region."""

    name: str
    dtype: str
    shape: list[int]
    start: int
    end: int

    def as_json(self) -> dict[str, object]:
        return {"dtype": self.dtype, "shape": self.shape, "data_offsets": [self.start, self.end]}


@dataclass(slots=True)
class Shard:
    """A checked safetensors file: its entries in header order and where its data region starts."""

    path: Path
    size: int
    data_start: int
    entries: dict[str, Entry]
    metadata: object


def _damaged(path: Path, what: str) -> DamagedShardError:
    return DamagedShardError(
        str(path), f"{path} is not a valid safetensors file: {what}; copy the shard again from the original export"
    )


def read(path: str | os.PathLike[str]) -> Shard:
    """Read and check the header of one safetensors file (raises DamagedShardError)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _damaged(path, f"header length {n} exceeds safetensors' limit of {MAX_HEADER} bytes")
            if 8 + n > size:
                raise _damaged(path, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise _damaged(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _damaged(path, "__metadata__ is not a map of strings")
    entries: dict[str, Entry] = {}
    for name, meta in header.items():
        entries[name] = _entry(path, name, meta)
    end = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != end:
            raise _damaged(
                path, f"tensor {e.name} starts at byte {e.start} of the data, expected {end} (gap or overlap)"
            )
        end = e.end
    data = size - 8 - n
    if end != data:
        raise _damaged(path, f"the tensors cover {end} bytes of data, the file holds {data}")
    return Shard(path, size, 8 + n, entries, metadata)


def _entry(path: Path, name: str, meta: object) -> Entry:
    if not isinstance(meta, dict):
        raise _damaged(path, f"the header entry of {name} is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in BITS:
        raise _damaged(path, f"tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _damaged(path, f"tensor {name} has shape {shape!r}, not a list of sizes")
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets))
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _damaged(path, f"tensor {name} has data_offsets {offsets!r}")
    bits = math.prod(shape) * BITS[str(dtype)]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise _damaged(
            path,
            f"tensor {name} is {dtype} {shape} ({bits / 8:g} bytes) but its data_offsets span "
            f"{offsets[1] - offsets[0]} bytes",
        )
    return Entry(name, str(dtype), shape, offsets[0], offsets[1])


def header_bytes(entries: list[Entry], metadata: object = None) -> bytes:
    """The 8-byte length and the JSON header for ``entries``, padded with spaces to 8 bytes, as safetensors writes."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update((e.name, e.as_json()) for e in entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
