"""status: the lines a newcomer reads first (pure parts; the process tests run it for real)."""

from __future__ import annotations

import sys
import types

import pytest

from vllm_modelopt_shim.__main__ import _wrapt_line, main


@pytest.mark.parametrize(
    ("version", "flagged"), [("2.1.2", True), ("1.17.0", True), ("2.4.0", False), ("2.5.2", False)]
)
def test_a_wrapt_older_than_the_shim_needs_is_flagged(
    monkeypatch: pytest.MonkeyPatch, version: str, flagged: bool
) -> None:
    monkeypatch.setitem(sys.modules, "wrapt", types.SimpleNamespace(__version__=version))
    line = _wrapt_line()
    assert line.startswith(f"wrapt: {version}") and ("TOO OLD" in line) is flagged


def test_a_missing_wrapt_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wrapt", None)
    assert "NOT importable" in _wrapt_line()


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "vllm-modelopt-shim" in out and "convert" in out
