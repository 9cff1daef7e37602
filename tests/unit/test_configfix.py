"""Config reconciliation: fill what one transformers generation omits, never override, refuse conflicts."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_modelopt_shim import ConfigConflictError
from vllm_modelopt_shim.configfix import plan, reconcile

T457 = {"num_experts": 4, "norm_topk_prob": True, "rope_scaling": {"mrope_section": [6, 5, 5]}, "rope_theta": 5000000}
T5 = {"num_local_experts": 4, "rope_parameters": {"mrope_section": [6, 5, 5], "rope_theta": 5000000}}


def fills(text: dict[str, Any]) -> dict[str, Any]:
    found, conflicts = plan(text)
    assert conflicts == []
    return {f.key: f.value for f in found}


def test_a_transformers_457_config_needs_nothing() -> None:
    assert fills(T457) == {}


def test_a_transformers_5_config_gets_norm_topk_prob_and_num_experts() -> None:
    assert fills(T5) == {"norm_topk_prob": True, "num_experts": 4}


def test_explicit_values_are_never_overridden() -> None:
    assert fills({**T5, "norm_topk_prob": False, "num_experts": 4}) == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ({**T5, "num_experts": 8}, "text_config.num_experts"),
        ({**T5, "rope_theta": 1000000}, "text_config.rope_theta"),
        ({**T5, "rope_scaling": {"mrope_section": [8, 4, 4]}}, "text_config.rope_scaling.mrope_section"),
    ],
)
def test_two_spellings_that_disagree_are_refused(text: dict[str, Any], key: str) -> None:
    _, conflicts = plan(text)
    assert [c.name for c in conflicts] == [key]
    assert "delete the wrong one" in str(conflicts[0])


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def to_diff_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not (k == "num_experts" and v == 60)}


def test_reconcile_applies_the_plan_to_the_object_and_logs_each_change(tmp_path: Any) -> None:
    # what transformers 4.57 makes of a transformers 5 config: num_experts falls back to 60
    text = _Obj(num_local_experts=4, num_experts=60, rope_parameters=T5["rope_parameters"])
    lines = reconcile(_Obj(text_config=text), source=None)
    assert text.num_experts == 4 and text.norm_topk_prob is True
    assert len(lines) == 2 and all(line.startswith("config: set text_config.") for line in lines)


def test_reconcile_reads_explicit_keys_from_config_json(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text('{"text_config": {"num_experts": 60, "num_local_experts": 4}}')
    with pytest.raises(ConfigConflictError):
        reconcile(_Obj(text_config=_Obj(num_experts=60, num_local_experts=4)), source=str(tmp_path))
