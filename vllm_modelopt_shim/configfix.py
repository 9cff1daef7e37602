"""Config reconciliation between transformers generations (placeholder until the config issue lands)."""

from __future__ import annotations

from typing import Any

__all__ = ["reconcile"]


def reconcile(hf_config: Any, source: str | None = None) -> list[str]:
    return []
