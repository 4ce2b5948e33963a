"""A console action's two halves (action_routes.py): its planner (the confirmation page) and
its runner (the action, once confirmed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ciris_billing.console.actions import Done
from ciris_billing.console.sessions import Session
from ciris_billing.deps import AppState
from ciris_billing.unit_of_work import UnitOfWork


@dataclass(frozen=True, slots=True)
class Plan:
    """What the confirmation page says and carries, and where to go afterwards."""

    title: str
    lines: list[str]
    fields: dict[str, str]  # posted again with the confirmation
    back: str  # the page the action concerns
    danger: bool = False


Planner = Callable[[AppState, UnitOfWork, dict[str, str]], Awaitable[Plan]]
Runner = Callable[[AppState, UnitOfWork, Session, dict[str, str], str], Awaitable[Done]]
