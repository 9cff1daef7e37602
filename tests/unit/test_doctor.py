"""The doctor: verdict, rename count and every problem, from headers alone (pure: no torch here either)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_modelopt_shim.__main__ import main
from vllm_modelopt_shim.doctor import CANNOT, NEEDS_SHIM, STOCK, diagnose, render

L = "model.language_model.layers"
SUFFIXES = {
    "weight": ("U8", [8, 8]),
    "weight_scale": ("F8_E4M3", [8, 1]),
    "weight_scale_2": ("F32", []),
    "input_scale": ("F32", []),
}


def save(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A real safetensors file: u64 header size, JSON header, then the data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blob = b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob)


def tensor(suffix: str, value: float = 0.01) -> tuple[str, list[int], bytes]:
    dtype, shape = SUFFIXES[suffix]
    n = 1
    for s in shape:
        n *= s
    return dtype, shape, struct.pack("<f", value) if dtype == "F32" else bytes(n)


def checkpoint(tmp: Path, layout: str = "legacy", generation: str = "4.57", **edits: Any) -> Path:
    ts: dict[str, tuple[str, list[int], bytes]] = {"lm_head.weight": ("BF16", [4, 8], bytes(64))}
    for layer in range(2):
        ts[f"{L}.{layer}.mlp.gate.weight"] = ("BF16", [4, 8], bytes(64))
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in SUFFIXES:
                    mid = f"{proj}.{e}" if layout == "legacy" else f"{e}.{proj}"
                    value = 0.01 * (1.2 if proj == "up_proj" and e == 1 else 1.0)
                    ts[f"{L}.{layer}.mlp.experts.{mid}.{suffix}"] = tensor(suffix, value)
    for name in edits.get("drop", ()):
        del ts[name]
    ts.update(edits.get("add", {}))
    text: dict[str, Any] = (
        {"num_experts": 4, "norm_topk_prob": True} if generation == "4.57" else {"num_local_experts": 4}
    )
    quant = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"]}
    (tmp / "config.json").write_text(json.dumps({"text_config": text, "quantization_config": quant}))
    shards = edits.get("shards")
    if shards:
        index = {}
        for i, part in enumerate(shards(ts)):
            name = f"model-0000{i + 1}-of-0000{len(shards(ts))}.safetensors"
            save(tmp / name, part)
            index.update(dict.fromkeys(part, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    else:
        save(tmp / "model.safetensors", ts)
    return tmp


def test_the_bug_reports_layout_needs_the_shim_and_counts_every_rename(tmp_path: Path) -> None:
    d = diagnose(checkpoint(tmp_path))
    assert d.verdict == NEEDS_SHIM and d.renames == 2 * 4 * 3 * 4 and d.problems == []
    assert d.as_dict()["layouts"] == {"legacy": 96} and d.quantization == "ModelOpt NVFP4"


def test_canonical_names_load_with_stock_vllm(tmp_path: Path) -> None:
    d = diagnose(checkpoint(tmp_path, layout="canonical"))
    assert d.verdict == STOCK and d.renames == 0


def test_a_transformers_5_config_needs_the_shim_for_its_config(tmp_path: Path) -> None:
    d = diagnose(checkpoint(tmp_path, layout="canonical", generation="5"))
    assert d.verdict == NEEDS_SHIM and d.renames == 0
    assert any("norm_topk_prob" in f for f in d.config_fixes) and any("num_experts = 4" in f for f in d.config_fixes)


def test_gate_up_scale_mismatch_is_a_warning_with_the_worst_ratio(tmp_path: Path) -> None:
    d = diagnose(checkpoint(tmp_path, layout="canonical"))
    assert d.verdict == STOCK and d.mismatched_experts == 2  # expert 1 of each layer
    assert d.worst_scale_ratio == pytest.approx(1.2, rel=1e-6)
    assert "1.200" in d.warnings[0] and "VLLM_MODELOPT_SHIM_HARMONIZE" in d.warnings[0]
    # the verdict carries its advice, so "loads with stock vLLM" does not read as "nothing to do"
    assert "serve it with the shim" in d.advice and "2 experts" in d.advice and "convert" in d.advice
    verdict = render(d).splitlines()[1].split()
    assert verdict[:5] == ["verdict", f"{STOCK}:", "stock", "vLLM", "loads"]


@pytest.mark.parametrize(
    ("edits", "tensor"),
    [
        ({"drop": [f"{L}.1.mlp.experts.up_proj.3.weight_scale_2"]}, f"{L}.1.mlp.experts.up_proj.3.weight_scale_2"),
        (
            {"add": {f"{L}.0.mlp.experts.gate_proj.0.input_scale": tensor("input_scale", 0.0)}},
            f"{L}.0.mlp.experts.gate_proj.0.input_scale",
        ),
        ({"add": {f"{L}.0.mlp.experts.gate_proj.7.weight": tensor("weight")}}, f"{L}.0.mlp.experts.gate_proj.7.weight"),
        ({"add": {f"{L}.0.mlp.experts.0.gate_proj.weight": tensor("weight")}}, f"{L}.0.mlp.experts.gate_proj.0.weight"),
        (
            {"add": {f"{L}.0.mlp.experts.gate_proj.0.pre_quant_scale": ("BF16", [8], bytes(16))}},
            f"{L}.0.mlp.experts.gate_proj.0.pre_quant_scale",
        ),
        (
            {"add": {f"{L}.1.mlp.experts.gate_up_proj": ("BF16", [4, 8, 8], bytes(512))}},
            f"{L}.1.mlp.experts.gate_up_proj",
        ),
        (
            {"add": {f"{L}.0.mlp.experts.gate_proj.0.weight_global_scale": ("F32", [1], bytes(4))}},
            f"{L}.0.mlp.experts.gate_proj.0.weight_global_scale",
        ),
    ],
    ids=["missing-scale", "zero-input-scale", "out-of-range", "duplicate", "awq", "mixed-layout", "mixed-family"],
)
def test_damaged_checkpoints_cannot_load_correctly_naming_the_tensor(
    tmp_path: Path, edits: dict[str, Any], tensor: str
) -> None:
    d = diagnose(checkpoint(tmp_path, **edits))
    assert d.verdict == CANNOT
    assert tensor in d.as_dict()["problem_tensors"] or any(tensor in p for p in d.as_dict()["problems"])


def test_a_multi_shard_index_is_read_across_shards(tmp_path: Path) -> None:
    def split(ts: dict[str, Any]) -> list[dict[str, Any]]:
        names = sorted(ts)
        return [{n: ts[n] for n in names[: len(names) // 2]}, {n: ts[n] for n in names[len(names) // 2 :]}]

    d = diagnose(checkpoint(tmp_path, shards=split))
    assert d.shards == 2 and d.verdict == NEEDS_SHIM and d.renames == 96


def test_json_is_exactly_one_object_and_exit_codes_follow_the_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = checkpoint(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    assert main(["doctor", str(good), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"verdict", "renames", "problems", "warnings"} <= set(data) and isinstance(data["renames"], int)
    bad = tmp_path / "b"
    bad.mkdir()
    checkpoint(bad, drop=[f"{L}.0.mlp.experts.down_proj.0.weight"])
    assert main(["doctor", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == CANNOT


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def _not_a_checkpoint(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A directory argument the doctor cannot use, and the words its message must carry."""
    if kind == "missing directory":
        return tmp_path / "nowhere", "no such directory"
    if kind == "a file":
        (tmp_path / "model.safetensors").write_bytes(b"")
        return tmp_path / "model.safetensors", "is not a directory"
    if kind == "no config.json":
        return tmp_path, "has no config.json"
    if kind == "no shards":
        (tmp_path / "config.json").write_text("{}")
        return tmp_path, "holds no *.safetensors"
    if kind == "config.json not JSON":
        (tmp_path / "config.json").write_text("{not json")
        return tmp_path / "config.json", "is not valid JSON"
    raise AssertionError(kind)


NOT_A_CHECKPOINT = ["missing directory", "a file", "no config.json", "no shards", "config.json not JSON"]


@pytest.mark.parametrize("kind", NOT_A_CHECKPOINT)
def test_json_on_a_usage_error_is_still_exactly_one_object_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """--help promises one JSON object on stdout: a usage error (exit 2) is one too, with the message."""
    named, words = _not_a_checkpoint(tmp_path, kind)
    target = named if kind != "config.json not JSON" else tmp_path
    assert main(["doctor", str(target), "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # the whole of stdout: exactly one object
    assert isinstance(data, dict) and data["verdict"] is None and data["path"] == str(target)
    assert str(named) in data["error"] and words in data["error"], data
    assert data["error"] in captured.err  # the same message for a reader of stderr


@pytest.mark.parametrize("kind", NOT_A_CHECKPOINT)
def test_the_table_forms_usage_error_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    named, words = _not_a_checkpoint(tmp_path, kind)
    target = named if kind != "config.json not JSON" else tmp_path
    assert main(["doctor", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("vllm-modelopt-shim doctor: ") and str(named) in line and words in line, line


def test_a_missing_directory_is_named_not_its_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "checkpoint"
    assert main(["doctor", str(missing), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error.startswith(f"{missing}: no such directory") and "config.json not found" not in error, error


def test_the_advice_spells_convert_as_this_command_was_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout has no console script: run as python -m, the advice must not send the user to one."""
    ckpt = checkpoint(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/checkout/vllm_modelopt_shim/__main__.py"])
    assert main(["doctor", str(ckpt), "--json"]) == 0
    assert "`python3 -m vllm_modelopt_shim convert`" in json.loads(capsys.readouterr().out)["advice"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vllm-modelopt-shim"])
    assert main(["doctor", str(ckpt), "--json"]) == 0
    assert "`vllm-modelopt-shim convert`" in json.loads(capsys.readouterr().out)["advice"]


def test_human_output_is_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(checkpoint(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "needs-shim" in out and "tensors the shim renames       96" in out


def test_pure_modules_import_neither_torch_nor_vllm() -> None:
    code = (
        "import sys\n"
        "from vllm_modelopt_shim import doctor, names, ledger, verify, stream, configfix, settings\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'wrapt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]", out.stderr


def _damage(path: Path, kind: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "header length 2**62":
        path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    elif kind == "non-JSON header":
        path.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n :])
    elif kind == "truncated header":
        path.write_bytes(raw[: 8 + n // 2])
    elif kind == "truncated data":
        path.write_bytes(raw[:-10])
    elif kind == "offsets past the end":
        header = json.loads(raw[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        start = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [start + 10**15, start + 10**15 + header[name]["data_offsets"][1] - start]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    else:
        raise AssertionError(kind)


DAMAGE = ["header length 2**62", "non-JSON header", "truncated header", "truncated data", "offsets past the end"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_shard_is_a_problem_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Read as safetensors itself checks a file: exit 1 (cannot load correctly), no traceback, bounded memory."""
    shard = checkpoint(tmp_path) / "model.safetensors"
    _damage(shard, kind)
    assert main(["doctor", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == CANNOT and data["problem_tensors"] == [str(shard)], data
    assert "not a valid safetensors file" in data["problems"][0]


def test_a_shard_listed_in_the_index_but_missing_is_a_problem(tmp_path: Path) -> None:
    def split(ts: dict[str, Any]) -> list[dict[str, Any]]:
        names = sorted(ts)
        return [{n: ts[n] for n in names[: len(names) // 2]}, {n: ts[n] for n in names[len(names) // 2 :]}]

    checkpoint(tmp_path, shards=split)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    d = diagnose(tmp_path)
    assert d.verdict == CANNOT and str(tmp_path / "model-00002-of-00002.safetensors") in [p.name for p in d.problems]


def test_headers_written_by_the_shim_read_back_identically(tmp_path: Path) -> None:
    from vllm_modelopt_shim import shards

    shard = checkpoint(tmp_path) / "model.safetensors"
    first = shards.read(shard)
    raw = shard.read_bytes()
    again = tmp_path / "again.safetensors"
    entries = [first.entries[n] for n in sorted(first.entries, key=lambda n: first.entries[n].start)]
    again.write_bytes(shards.header_bytes(entries, first.metadata) + raw[first.data_start :])
    second = shards.read(again)
    assert {n: e.as_json() for n, e in second.entries.items()} == {n: e.as_json() for n, e in first.entries.items()}
    assert second.metadata == first.metadata and (second.data_start - 8) % 8 == 0
