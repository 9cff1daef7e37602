"""Environment variables: documented values only; anything else warns once and takes the default."""

from __future__ import annotations

import pytest

from vllm_modelopt_shim.settings import Settings, load


def test_defaults_are_on_error_on_no_report() -> None:
    s = load({})
    assert (s.enabled, s.verify, s.harmonize, s.report_dir, s.awq) == (True, "error", True, None, "fold")


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", " on "])
def test_truthy_values_enable(value: str) -> None:
    assert load({"VLLM_MODELOPT_SHIM": value}).enabled


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_falsy_values_disable(value: str) -> None:
    assert not load({"VLLM_MODELOPT_SHIM": value}).enabled
    assert not load({"VLLM_MODELOPT_SHIM_HARMONIZE": value}).harmonize


def test_unknown_value_warns_once_naming_accepted_values_then_defaults() -> None:
    warnings: list[str] = []
    s = load({"VLLM_MODELOPT_SHIM": "maybe"}, warn=warnings.append)
    assert s.enabled
    assert len(warnings) == 1
    assert "maybe" in warnings[0] and "1/true/on/yes" in warnings[0] and "0/false/off/no" in warnings[0]


@pytest.mark.parametrize("mode", ["error", "warn", "off", "WARN"])
def test_verify_modes(mode: str) -> None:
    assert load({"VLLM_MODELOPT_SHIM_VERIFY": mode}).verify == mode.lower()


def test_unknown_verify_mode_warns_and_defaults_to_error() -> None:
    warnings: list[str] = []
    assert load({"VLLM_MODELOPT_SHIM_VERIFY": "strict"}, warn=warnings.append).verify == "error"
    assert len(warnings) == 1 and "error, warn, off" in warnings[0]


@pytest.mark.parametrize("mode", ["fold", "refuse", " REFUSE "])
def test_awq_modes(mode: str) -> None:
    assert load({"VLLM_MODELOPT_SHIM_AWQ": mode}).awq == mode.strip().lower()


@pytest.mark.parametrize("value", ["ignore", "drop", "1"])
def test_unknown_awq_mode_warns_and_defaults_to_fold(value: str) -> None:
    warnings: list[str] = []
    assert load({"VLLM_MODELOPT_SHIM_AWQ": value}, warn=warnings.append).awq == "fold"
    assert len(warnings) == 1 and value in warnings[0] and "fold, refuse" in warnings[0]


def test_report_dir() -> None:
    assert load({"VLLM_MODELOPT_SHIM_REPORT": "/tmp/r"}).report_dir == "/tmp/r"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.enabled = False  # type: ignore[misc]
    with pytest.raises(ValueError):
        Settings(verify="sometimes")
    with pytest.raises(ValueError):
        Settings(awq="ignore")
    assert repr(Settings()) == "Settings(enabled=True, verify='error', harmonize=True, report_dir=None, awq='fold')"
