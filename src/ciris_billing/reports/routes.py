"""The reports' admin API: revenue and usage (JSON, or CSV with `Accept: text/csv`), and the
streamed CSV exports of the ledger's and the lots' movements."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse

from ciris_billing.deps import AdminKey, StateDep, UnitOfWorkDep, json_response
from ciris_billing.errors import InvalidRequest, error_responses
from ciris_billing.reports import exports, revenue, rollups, tables

router = APIRouter(prefix="/v1/billing", tags=["reports"], responses=error_responses(401, 403, 422))

# Ten years of days at most in one report (a day's row is small; this bounds the answer).
MAX_DAYS = 3_700

From = Annotated[date, Query(alias="from", description="First UTC day (YYYY-MM-DD)")]
To = Annotated[date, Query(alias="to", description="Last UTC day, included (YYYY-MM-DD)")]
Per = Annotated[Literal["day", "month"], Query(description="One row per day or per month")]
Accept = Annotated[str | None, Header(description="`text/csv` for CSV, else JSON")]
CSV = {"text/csv": {"schema": {"type": "string"}}}


def checked_span(first: date, last: date) -> None:
    if last < first:
        raise InvalidRequest("`to` is before `from`")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"at most {MAX_DAYS} days in one report")


def csv_response(body: str, name: str) -> Response:
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


@router.get("/reports/revenue", responses={200: {"content": CSV}})
async def revenue_report(
    first: From,
    last: To,
    work: UnitOfWorkDep,
    state: StateDep,
    _key: AdminKey,
    granularity: Per = "day",
    currency: Annotated[str | None, Query(pattern="^[A-Za-z]{3}$")] = None,
    accept: Accept = None,
) -> Response:
    """Revenue from lots per period: purchases, refunds, recognized, breakage, and deferred
    revenue at the period's start and end (deferred_end = deferred_start + purchases - refunds
    - recognized - breakage, exactly). Minor units of one currency (default: the
    installation's)."""
    checked_span(first, last)
    chosen = (currency or state.settings.currency).upper()
    rows = await rollups.revenue_report(await work.connection(), chosen, first, last, granularity)
    if tables.wants_csv(accept):
        return csv_response(tables.revenue_csv(rows), f"revenue-{first}-{last}")
    return json_response(200, {"rows": [row.as_dict() for row in rows]})


@router.get("/reports/usage", responses={200: {"content": CSV}})
async def usage_report(
    first: From,
    last: To,
    work: UnitOfWorkDep,
    _key: AdminKey,
    granularity: Per = "day",
    accept: Accept = None,
) -> Response:
    """Uses per period by lot kind (free, promotional, paid) and by feature; active accounts
    (charged in the period), new accounts, and accounts that bought for the first time."""
    checked_span(first, last)
    rows = await rollups.usage_report(await work.connection(), first, last, granularity)
    if tables.wants_csv(accept):
        return csv_response(tables.usage_csv(rows), f"usage-{first}-{last}")
    return json_response(200, {"rows": [row.as_dict() for row in rows]})


@router.get("/exports/{export}", responses={200: {"content": CSV}})
async def export_csv(
    export: exports.Export,
    first: From,
    last: To,
    state: StateDep,
    _key: AdminKey,
    account_id: Annotated[str | None, Query(max_length=40)] = None,
) -> StreamingResponse:
    """The ledger's rows (`ledger`: charges and credits) or the lots' movements (`lots`:
    grants, and each charge's and credit's uses per lot) from `from` to `to` (UTC days,
    included), for one account or all, as CSV streamed in constant memory."""
    checked_span(first, last)
    start = revenue.day_start(first)
    end = revenue.day_start(last) + timedelta(1)
    return StreamingResponse(
        exports.stream_csv(state.engine, export, start, end, account_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{export}-{first}-{last}.csv"'},
    )
