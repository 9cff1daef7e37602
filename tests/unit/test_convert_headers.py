"""convert SRC DST --no-harmonize on the doctor's header-level checkpoints: pure (no torch), byte-level checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_doctor import L, _damage, checkpoint

from vllm_modelopt_shim import shards
from vllm_modelopt_shim.__main__ import main
from vllm_modelopt_shim.doctor import CANNOT, STOCK, diagnose
from vllm_modelopt_shim.names import canonical


def convert(src: Path, dst: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["convert", str(src), str(dst), "--no-harmonize", "--json", *extra])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def data_of(path: Path) -> dict[str, bytes]:
    """tensor name -> its bytes, read through the checked header."""
    shard, raw = shards.read(path), path.read_bytes()
    return {n: raw[shard.data_start + e.start : shard.data_start + e.end] for n, e in shard.entries.items()}


def split(ts: dict[str, Any]) -> list[dict[str, Any]]:
    names = sorted(ts)
    return [{n: ts[n] for n in names[: len(names) // 2]}, {n: ts[n] for n in names[len(names) // 2 :]}]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = checkpoint(tmp_path / "src" if (tmp_path / "src").mkdir() is None else tmp_path, shards=split)
    (path / "tokenizer.json").write_text('{"model": "bpe"}\n')
    (path / "generation_config.json").write_text('{"do_sample": false}')
    return path


def test_every_tensor_keeps_its_bytes_under_the_name_vllm_expects(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    code, out = convert(src, dst, capsys=capsys)
    assert code == 0 and out["verdict"] == "converted" and out["renamed"] == 96 and out["harmonized"] == 0
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        before, after = data_of(src / name), data_of(dst / name)
        assert after == {canonical(n): b for n, b in before.items()}
        assert (dst / name).read_bytes().endswith((src / name).read_bytes()[shards.read(src / name).data_start :])
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"{L}.0.mlp.experts.3.up_proj.weight_scale_2" in index and not any(".up_proj.3." in n for n in index)
    for other in ("tokenizer.json", "generation_config.json"):
        assert (dst / other).read_bytes() == (src / other).read_bytes()
    assert diagnose(dst).verdict == STOCK


def test_converting_twice_changes_nothing(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    convert(src, tmp_path / "once", capsys=capsys)
    code, out = convert(tmp_path / "once", tmp_path / "twice", capsys=capsys)
    assert code == 0 and out["renamed"] == 0
    for f in (tmp_path / "once").iterdir():
        assert (tmp_path / "twice" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_transformers_5_config_gets_the_keys_every_release_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = checkpoint(tmp_path / "t5" if (tmp_path / "t5").mkdir() is None else tmp_path, generation="5")
    code, out = convert(src, tmp_path / "dst", capsys=capsys)
    text = json.loads((tmp_path / "dst" / "config.json").read_text())["text_config"]
    assert code == 0 and text == {"num_local_experts": 4, "norm_topk_prob": True, "num_experts": 4}
    assert len(out["config_fixes"]) == 2 and diagnose(tmp_path / "dst").config_fixes == []


def test_a_checkpoint_that_cannot_load_correctly_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    checkpoint(bad, drop=[f"{L}.0.mlp.experts.down_proj.0.weight"])
    code, out = convert(bad, tmp_path / "dst", capsys=capsys)
    assert code == 1 and out["verdict"] == CANNOT and f"{L}.0.mlp.experts.down_proj.0.weight" in out["problems"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("kind", ["header length 2**62", "non-JSON header", "truncated data", "offsets past the end"])
def test_a_damaged_shard_is_refused_by_file_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _damage(checkpoint(src) / "model.safetensors", kind)
    code, out = convert(src, tmp_path / "dst", capsys=capsys)
    assert code == 1 and out["problem_tensors"] == [str(src / "model.safetensors")]
    assert not (tmp_path / "dst").exists()


def test_usage_errors_exit_2(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert convert(src, taken, capsys=capsys)[0] == 2 and (taken / "x").read_text() == "mine"
    assert convert(tmp_path / "nowhere", tmp_path / "dst", capsys=capsys)[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(src, empty, capsys=capsys)[0] == 0  # an empty directory is fine


def test_an_interrupted_convert_leaves_no_dst(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vllm_modelopt_shim.convert as conv

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["convert", str(src), str(tmp_path / "dst"), "--no-harmonize"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary sibling


def test_no_harmonize_runs_without_torch(src: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from vllm_modelopt_shim.__main__ import main\n"
        f"sys.exit(main(['convert', {str(src)!r}, {str(tmp_path / 'dst')!r}, '--no-harmonize']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert "[convert] shard 2/2" in r.stderr and "96 tensors renamed" in r.stderr  # progress and summary on stderr


def test_convert_json_prints_one_object_on_a_usage_error_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["convert", str(missing), str(tmp_path / "dst"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] is None and str(missing) in out["error"] and not (tmp_path / "dst").exists()
