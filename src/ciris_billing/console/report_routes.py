"""The console's reports page (revenue and usage tables, CSV links) and its CSV downloads,
for a signed-in operator (the session is the credential, as on every console page)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from ciris_billing.console import report_views
from ciris_billing.console.web import page, problem, session_of, to_login
from ciris_billing.deps import StateDep, UnitOfWorkDep
from ciris_billing.errors import ReportNotFound
from ciris_billing.reports import exports, revenue, tables
from ciris_billing.reports.routes import checked_span, csv_response
from ciris_billing.web.templating import PAGE_HEADERS

router = APIRouter(prefix="/console", include_in_schema=False)

Day = Annotated[date | None, Query()]
Per = Annotated[Literal["day", "month"], Query()]


def _span(first: date | None, last: date | None) -> tuple[date, date]:
    default_first, default_last = report_views.last_days(30)
    chosen = (first or default_first, last or default_last)
    checked_span(*chosen)
    return chosen


@router.get("/reports")
async def reports_page(
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    first: Annotated[date | None, Query(alias="from")] = None,
    last: Annotated[date | None, Query(alias="to")] = None,
    granularity: Per = "day",
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    span = _span(first, last)
    found = await report_views.reports(
        await work.connection(), state.settings.currency, *span, granularity
    )
    query = f"from={span[0]}&to={span[1]}&granularity={granularity}"
    return page(
        "console_reports.html",
        session,
        found=found,
        query=query,
        features=sorted({name for row in found.usage for name in row.uses_by_feature}),
        nav="reports",
    )


@router.get("/reports/{name}.csv")
async def report_csv(
    name: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    first: Annotated[date | None, Query(alias="from")] = None,
    last: Annotated[date | None, Query(alias="to")] = None,
    granularity: Per = "day",
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    if name not in ("revenue", "usage"):  # checked after the session: a stranger learns nothing
        return problem(ReportNotFound(f"No report named {name}"), session)
    span = _span(first, last)
    found = await report_views.reports(
        await work.connection(), state.settings.currency, *span, granularity
    )
    body = tables.revenue_csv(found.revenue) if name == "revenue" else tables.usage_csv(found.usage)
    response = csv_response(body, f"{name}-{span[0]}-{span[1]}")
    response.headers.update({"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
    return response


@router.get("/exports/{name}.csv")
async def export_csv(
    name: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    first: Annotated[date | None, Query(alias="from")] = None,
    last: Annotated[date | None, Query(alias="to")] = None,
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    if name not in exports.QUERIES:  # checked after the session: a stranger learns nothing
        return problem(ReportNotFound(f"No export named {name}"), session)
    kind: exports.Export = "ledger" if name == "ledger" else "lots"
    span = _span(first, last)
    return StreamingResponse(
        exports.stream_csv(
            state.engine,
            kind,
            revenue.day_start(span[0]),
            revenue.day_start(span[1]) + timedelta(1),
        ),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-{span[0]}-{span[1]}.csv"',
            "Cache-Control": PAGE_HEADERS["Cache-Control"],
        },
    )
