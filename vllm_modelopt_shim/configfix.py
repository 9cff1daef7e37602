"""config.json written by either transformers generation, read correctly by every vLLM release.

transformers 5 writes ``num_local_experts`` and ``rope_parameters`` and drops ``norm_topk_prob``
(its router always renormalizes top-k); transformers 4.57 writes ``num_experts``, ``rope_scaling``
and ``rope_theta``.  vLLM's Qwen3-MoE block reads ``norm_topk_prob`` (0.24+ crash without it) and
0.17.1's transformers reads only ``num_experts`` (silently 60 otherwise).

``plan`` is pure (dicts in, findings out) and shared with the doctor; ``reconcile`` applies it to
vLLM's config object before the model is built.  A value config.json sets is never overridden;
two spellings that disagree are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigConflictError

__all__ = ["Fill", "plan", "reconcile", "raw_text_config"]

_WHY_TOPK = "transformers 5 omits it because its router always renormalizes top-k, as Qwen's configs state"
_WHY_EXPERTS = "the transformers 5 spelling, which transformers 4.57 does not read (it would use 60)"


@dataclass(slots=True)
class Fill:
    """One setting config.json implies but does not spell the way some transformers reads it."""

    key: str
    value: Any
    why: str

    def describe(self) -> str:
        return f"text_config.{self.key} = {self.value!r} ({self.why})"


def plan(text: Mapping[str, Any]) -> tuple[list[Fill], list[ConfigConflictError]]:
    """What config.json's ``text_config`` lacks for some transformers generation, and what conflicts."""
    fills: list[Fill] = []
    conflicts: list[ConfigConflictError] = []
    if "norm_topk_prob" not in text:
        fills.append(Fill("norm_topk_prob", True, _WHY_TOPK))
    if "num_local_experts" in text:
        if "num_experts" not in text:
            fills.append(Fill("num_experts", text["num_local_experts"], _WHY_EXPERTS))
        elif text["num_experts"] != text["num_local_experts"]:
            conflicts.append(
                _conflict("num_experts", text["num_experts"], "num_local_experts", text["num_local_experts"])
            )
    # Rope: every tested release reads either spelling (measured: 0.17.1 reads rope_parameters, and
    # transformers 5 converts rope_scaling/rope_theta), so only a disagreement needs action.
    rope = text.get("rope_parameters")
    if isinstance(rope, Mapping):
        if "rope_theta" in rope and "rope_theta" in text and text["rope_theta"] != rope["rope_theta"]:
            conflicts.append(
                _conflict("rope_theta", text["rope_theta"], "rope_parameters.rope_theta", rope["rope_theta"])
            )
        old = text.get("rope_scaling")
        if isinstance(old, Mapping):
            for key, value in rope.items():
                if key in old and old[key] != value:
                    conflicts.append(_conflict(f"rope_scaling.{key}", old[key], f"rope_parameters.{key}", value))
    return fills, conflicts


def _conflict(a: str, va: Any, b: str, vb: Any) -> ConfigConflictError:
    return ConfigConflictError(
        f"text_config.{a}",
        f"config.json sets text_config.{a} = {va!r} and text_config.{b} = {vb!r}: the transformers 4 and 5 "
        f"spellings of one setting disagree, so which one a vLLM release reads decides the model; "
        f"delete the wrong one from config.json",
    )


def raw_text_config(hf_config: Any, source: str | None) -> Mapping[str, Any]:
    """config.json's text_config as written (explicit keys only), else the config's non-default keys."""
    path = None
    if source and os.path.isdir(source):
        path = os.path.join(source, "config.json")
    elif source:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            path = cached if isinstance(cached, str) else None
        except Exception:
            path = None
    if path and os.path.isfile(path):
        with open(path) as f:
            text = json.load(f).get("text_config")
        if isinstance(text, Mapping):
            return text
    text_config = getattr(hf_config, "text_config", None)
    diff = getattr(text_config, "to_diff_dict", None)
    return diff() if callable(diff) else {}


def reconcile(hf_config: Any, source: str | None = None) -> list[str]:
    """Apply ``plan`` to vLLM's hf_config in place; returns one log line per change made.

    Raises the first ConfigConflictError.  Only Qwen3-VL-MoE configs reach here (the patch wraps
    that class alone); a value the object already holds is left alone.
    """
    text_config = getattr(hf_config, "text_config", None)
    if text_config is None:
        return []
    fills, conflicts = plan(raw_text_config(hf_config, source))
    if conflicts:
        raise conflicts[0]
    lines = []
    for fill in fills:
        if getattr(text_config, fill.key, None) != fill.value:
            setattr(text_config, fill.key, fill.value)
            lines.append(f"config: set {fill.describe()}")
    return lines
