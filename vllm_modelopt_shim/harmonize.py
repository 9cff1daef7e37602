"""Gate/up global-scale harmonization (placeholder until the harmonization issue lands)."""

from __future__ import annotations

from typing import Any

__all__ = ["apply"]


def apply(model: Any, family: str) -> str | None:
    return None
