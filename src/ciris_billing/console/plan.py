"""A console action's plan: what its confirmation page says and carries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """What the confirmation page says and carries, and where to go afterwards."""

    title: str
    lines: list[str]
    fields: dict[str, str]  # posted again with the confirmation
    back: str  # the page the action concerns
    danger: bool = False
