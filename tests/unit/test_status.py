"""status and --help: the lines a newcomer reads first (pure parts; the process tests run status for real)."""

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


def test_convert_help_says_what_each_mode_needs(capsys: pytest.CaptureFixture[str]) -> None:
    """The default (harmonizing) mode needs numpy; --no-harmonize needs nothing beyond Python."""
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    option = out[out.index("--no-harmonize every tensor") :]
    assert "nothing beyond Python" in option and "needs numpy" in option
    assert "by default harmonized gate/up global scales, which needs numpy" in out


def test_status_help_names_the_interpreter_to_run_it_in(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    assert "the python that runs vLLM" in " ".join(capsys.readouterr().out.split())
