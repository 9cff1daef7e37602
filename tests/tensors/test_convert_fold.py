"""convert with harmonization (the default) writes exactly the bytes the runtime shim hands vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import checkpoints  # noqa: E402

from vllm_modelopt_shim.__main__ import main  # noqa: E402
from vllm_modelopt_shim.doctor import STOCK, diagnose  # noqa: E402
from vllm_modelopt_shim.harmonize import Folder  # noqa: E402
from vllm_modelopt_shim.ledger import Ledger  # noqa: E402
from vllm_modelopt_shim.names import COMPRESSED, MODELOPT  # noqa: E402
from vllm_modelopt_shim.stream import rewrite  # noqa: E402

tensors, as_bytes = checkpoints.read, checkpoints.as_bytes


@pytest.mark.parametrize(
    ("family", "split"), [("modelopt", None), ("compressed-tensors", None), ("modelopt", "gate-up-first")]
)
def test_the_default_convert_equals_what_the_runtime_hands_vllm(tmp_path: Path, family: str, split: str | None) -> None:
    src = checkpoints.write(tmp_path / "src", family=family, layout="legacy", up_mismatch=1.3, split=split)
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    fam = MODELOPT if family == "modelopt" else COMPRESSED
    folder = Folder(reciprocal=fam == COMPRESSED, num_experts=4)
    runtime = {
        n: as_bytes(t)
        for n, t in rewrite(tensors(src), Ledger(fam, 4), scalar=torch.Tensor.item, fold=folder, final=True)
    }
    written = {n: as_bytes(t) for n, t in tensors(tmp_path / "dst")}
    assert folder.result.harmonized == 8 and written == runtime
    d = diagnose(tmp_path / "dst")
    assert d.verdict == STOCK and d.mismatched_experts == 0 and d.renames == 0
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "again")]) == 0  # idempotent
    for f in (tmp_path / "dst").iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name
