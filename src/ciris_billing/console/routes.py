"""The console's pages: login and logout, overview, search, an account, the webhook inbox, API
keys and the audit log. Every page needs a live session (else: back to the login form); every
form carries a CSRF token (the login form too). No API key header: the session is the
credential, and the edge leaves these routes to it (they declare no key scope)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ciris_billing import audit_trail, auth
from ciris_billing.accounts import lots
from ciris_billing.accounts.answers import portal_link
from ciris_billing.accounts.service import Identity
from ciris_billing.console import outgoing, queries, report_views
from ciris_billing.console.sessions import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    LOGIN_NONCE_SECONDS,
    SESSION_COOKIE,
    Session,
    close,
    login_csrf,
    login_nonce,
    open_session,
    same_token,
    valid_nonce,
)
from ciris_billing.console.web import (
    check_csrf,
    form_of,
    is_https,
    page,
    problem,
    redirect,
    session_cookie,
    session_of,
    to_login,
)
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep
from ciris_billing.errors import (
    AuthenticationRequired,
    BillingError,
    CsrfRefused,
    RateLimited,
    ScopeMissing,
)
from ciris_billing.observability import credit_checks_served, log
from ciris_billing.unit_of_work import UnitOfWork
from ciris_billing.web.templating import render, static_response

router = APIRouter(prefix="/console", include_in_schema=False)

CursorQuery = Annotated[str | None, Query(max_length=200)]
NoticeQuery = Annotated[str | None, Query(max_length=64)]


@router.get("/static/{name}")
async def static(name: str) -> Response:
    try:
        return static_response(name)
    except KeyError:
        return Response(status_code=404)


def client_address(request: Request) -> str:
    """The client's address: the connection's, or the one a trusted proxy forwarded (`serve`
    trusts X-Forwarded-For only from FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


def _login_page(
    state: AppState, request: Request, error: str | None = None, status_code: int = 200
) -> Response:
    secret, client = state.secrets.console_secret, client_address(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or ""
    if not valid_nonce(secret, nonce, client):  # only a nonce this server issued to this client
        nonce = login_nonce(secret, client)
    response = render(
        "console_login.html",
        status_code=status_code,
        session=None,
        csrf_token=login_csrf(state.secrets.console_secret, nonce),
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_NONCE_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request, state),
    )
    return response


@router.get("/login")
async def login_form(request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    if await session_of(request, state, work) is not None:
        return redirect("/console")
    return _login_page(state, request)


@router.post("/login")
async def login(request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    """An admin API key opens a session. Failed attempts are limited per client address."""
    client = client_address(request)
    try:
        form = await form_of(request)
        nonce = request.cookies.get(LOGIN_COOKIE)
        secret = state.secrets.console_secret
        if not (
            nonce
            and valid_nonce(secret, nonce, client)
            and same_token(login_csrf(secret, nonce), form.get("csrf_token"))
        ):
            raise CsrfRefused("The login form expired or was not sent from this page; try again")
    except BillingError as exc:
        log.warning("console_login_refused", client=client, reason=exc.code)
        return problem(exc, None, back="/console/login")
    wait = await state.console_logins.waiting(client)
    if wait is not None:
        log.warning("console_login_rate_limited", client=client)
        seconds = max(1, int(wait) + 1)
        refused = RateLimited(f"Too many failed logins; try again in {seconds} s")
        response = problem(refused, None, back="/console/login")
        response.headers["Retry-After"] = str(seconds)
        return response
    try:
        principal = await state.keys.authenticate(form.get("api_key", "").strip(), "admin")
    except (AuthenticationRequired, ScopeMissing):
        await state.console_logins.failed(client)
        # The client's address, for the operator who looks for who is guessing (never the key).
        log.warning("console_login_failed", client=client)
        return _login_page(
            state,
            request,
            error="That key is not a valid admin API key.",
            status_code=401,
        )
    token, session = await open_session(await work.connection(), principal, state.settings)
    log.info("console_login", operator=session.operator.name, client=client)
    response = redirect("/console")
    session_cookie(response, request, state, token, state.settings.console_session_max_seconds)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/logout")
async def logout(request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    try:
        check_csrf(session, await form_of(request))
    except BillingError as exc:
        return problem(exc, session)
    await close(await work.connection(), request.cookies.get(SESSION_COOKIE))
    response = to_login()
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


async def _notice(work: UnitOfWork, notice: str | None) -> object | None:
    """The audit row of the action just done, shown once on the page it redirected to."""
    if not notice:
        return None
    return await audit_trail.entry(await work.connection(), notice)


@router.get("")
async def overview(
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    stuck_after = timedelta(seconds=max(state.settings.reconcile_after_seconds, 60))
    conn = await work.connection()
    figures = await queries.overview(conn, stuck_after)
    retrying, troubled = await outgoing.failing(conn)
    first, last = report_views.last_days(days)
    found = await report_views.reports(conn, state.settings.currency, first, last, "day")
    return page(
        "console_overview.html",
        session,
        figures=figures,
        retrying=retrying,
        troubled=troubled,
        checks=credit_checks_served(),
        charts=report_views.overview_charts(found),
        days=days,
        windows=report_views.WINDOWS,
        nav="overview",
    )


@router.get("/accounts")
async def search(
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    q: Annotated[str, Query(max_length=320)] = "",
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    found = await queries.search(await work.connection(), q) if q.strip() else []
    if len(found) == 1:
        return redirect(f"/console/accounts/{found[0].id}")
    return page("console_search.html", session, q=q, found=found, nav="accounts")


@router.get("/accounts/{account_id}")
async def account_page(
    account_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    before: CursorQuery = None,
    notice: NoticeQuery = None,
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    conn = await work.connection()
    row = await queries.account(conn, account_id)
    if row is None:
        return render(
            "console_problem.html",
            status_code=404,
            session=session,
            title="No such account",
            message=f"There is no account {account_id}.",
            code="account_not_found",
            back="/console/accounts",
        )
    detail = await queries.account_detail(conn, row)
    # The user's own portal, for support to send them (none once the account is erased).
    portal = (
        None
        if row.erased_at is not None
        else portal_link(state, request, Identity(row.oauth_provider, row.external_id))
    )
    ledger = await queries.ledger(conn, account_id, before)
    trail = await audit_trail.entries(conn, account_id=account_id, limit=30)
    account_lots = await lots.account_lots(conn, row, closed=True)
    return page(
        "console_account.html",
        session,
        a=row,
        d=detail,
        portal=portal,
        ledger=ledger,
        lots=account_lots,
        paged=before is not None,
        trail=trail,
        changes=audit_trail.changes,
        notice=await _notice(work, notice),
        nav="accounts",
    )


@router.get("/webhooks")
async def webhook_inbox(
    request: Request, state: StateDep, work: UnitOfWorkDep, notice: NoticeQuery = None
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    unhandled, unapplied = await queries.inbox(await work.connection())
    return page(
        "console_webhooks.html",
        session,
        unhandled=unhandled,
        unapplied=unapplied,
        provider=state.provider.name,
        notice=await _notice(work, notice),
        changes=audit_trail.changes,
        nav="webhooks",
    )


@router.get("/endpoints")
async def endpoints_page(
    request: Request, state: StateDep, work: UnitOfWorkDep, notice: NoticeQuery = None
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    views = await outgoing.overview(await work.connection())
    return page(
        "console_endpoints.html",
        session,
        views=views,
        notice=await _notice(work, notice),
        changes=audit_trail.changes,
        nav="endpoints",
    )


@router.get("/keys")
async def keys_page(
    request: Request, state: StateDep, work: UnitOfWorkDep, notice: NoticeQuery = None
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    return _keys(
        session, await auth.list_keys(await work.connection()), await _notice(work, notice)
    )


def _keys(session: Session, keys: list[object], notice: object | None) -> Response:
    return page(
        "console_keys.html",
        session,
        keys=keys,
        scopes=auth.SCOPES,
        notice=notice,
        changes=audit_trail.changes,
        nav="keys",
    )


@router.get("/audit")
async def audit_log(request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    trail = await audit_trail.entries(await work.connection(), limit=200)
    return page(
        "console_audit.html", session, trail=trail, changes=audit_trail.changes, nav="audit"
    )
