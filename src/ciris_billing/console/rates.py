"""The console's rates: the list, and setting a feature's rate (confirmed, audited), the twin
of POST /v1/billing/rates and `ciris-billing rates set`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ciris_billing.console.action_plan import Plan
from ciris_billing.console.actions import Done
from ciris_billing.console.sessions import Session
from ciris_billing.console.web import page, session_of, to_login
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep
from ciris_billing.errors import InvalidRequest
from ciris_billing.rates import service
from ciris_billing.rates.schemas import RateSet
from ciris_billing.unit_of_work import UnitOfWork

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/rates")
async def rates_page(request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    rows = await service.all_rates(await work.connection())
    return page("console_rates.html", session, rates=rows, nav="rates")


def _rate(form: dict[str, str]) -> service.Rate:
    try:
        valid = RateSet.model_validate(
            {
                "feature": form.get("feature", "").strip(),
                "units_per_use": int(form.get("units_per_use", "").strip()),
                "rounding": form.get("rounding", ""),
            }
        )
    except (ValueError, ValidationError):
        raise InvalidRequest(
            "A rate needs a feature (lower-case letters, digits and _ . : -), a whole number "
            "of units per use (at least 1) and a rounding (up or carry)"
        ) from None
    return service.Rate(valid.feature, valid.units_per_use, valid.rounding)


async def plan_set_rate(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    rate = _rate(form)
    return Plan(
        "Set this rate?",
        [
            f"Feature: {rate.feature}",
            f"One use per {rate.units_per_use} units, rounding {rate.rounding}",
            "It replaces the feature's rate if it has one; charges use it within "
            f"{state.settings.rates_refresh_seconds:g} s.",
        ],
        {k: str(v) for k, v in rate.as_dict().items()},
        "/console/rates",
    )


async def set_rate(
    state: AppState, work: UnitOfWork, session: Session, form: dict[str, str], request_id: str
) -> Done:
    _out, entry_id = await service.set_rate(
        await work.connection(), session.operator, _rate(form), request_id
    )
    state.rate_book.forget()
    return Done(entry_id, None)
