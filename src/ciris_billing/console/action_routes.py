"""The console's actions, each in two steps: a form posts to `/console/actions/{action}`, which
answers a confirmation page (what will change, with a one-time confirmation id and the token
the server issued for exactly that: console/confirmations.py); its Confirm button posts the
same fields with `confirm=yes`, and the action runs, only with that token (console/actions.py: the
service functions the API and CLI use, and the audit-trail row, in one unit of work). Then a
redirect to the page it concerns, which shows the audit row as the notice of what was done."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ciris_billing import auth
from ciris_billing.checkout.routes import format_price
from ciris_billing.console import actions, confirmations, queries, rates
from ciris_billing.console.action_plan import Plan, Planner, Runner
from ciris_billing.console.catalog import CATALOG_ACTIONS
from ciris_billing.console.web import (
    check_csrf,
    form_of,
    page,
    problem,
    redirect,
    session_of,
    to_login,
)
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep
from ciris_billing.errors import BillingError, CsrfRefused, InvalidRequest
from ciris_billing.events import endpoints
from ciris_billing.payments import refunds
from ciris_billing.payments.purchases import api_status
from ciris_billing.unit_of_work import UnitOfWork
from ciris_billing.web.templating import render

router = APIRouter(prefix="/console/actions", include_in_schema=False)


def _int(form: dict[str, str], name: str, label: str) -> int:
    try:
        return int(form.get(name, "").strip())
    except ValueError:
        raise InvalidRequest(f"{label} must be a whole number") from None


def _required(form: dict[str, str], name: str, label: str) -> str:
    value = form.get(name, "").strip()
    if not value or len(value) > 500:
        raise InvalidRequest(f"{label} is required (at most 500 characters)")
    return value


def _who(row: Any) -> str:
    return f"{row.id} ({row.oauth_provider} / {row.external_id})"


async def _account(work: UnitOfWork, form: dict[str, str]) -> Any:
    account_id = _required(form, "account_id", "The account")
    row = await queries.account(await work.connection(), account_id)
    if row is None:
        raise InvalidRequest(f"No account {account_id}")
    return row


async def _plan_grant(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    row = await _account(work, form)
    uses = _int(form, "uses", "Uses")
    reason = _required(form, "reason", "A reason")
    if uses == 0 or abs(uses) > actions.MAX_GRANT:
        raise InvalidRequest(
            f"Uses must be between -{actions.MAX_GRANT} and {actions.MAX_GRANT}, not 0"
        )
    paid = int(row.paid_uses_remaining)
    verb = f"Grant {uses} paid uses to" if uses > 0 else f"Take back {-uses} paid uses from"
    fields = {"account_id": row.id, "uses": str(uses), "reason": reason}
    lines = [
        f"Account: {_who(row)}",
        f"Paid uses: {paid} → {paid + uses}",
        f"Reason (on the ledger row): {reason}",
    ]
    if form.get("expires_in_days", "").strip():
        days = _int(form, "expires_in_days", "Expires in days")
        if uses < 0 or not 1 <= days <= 36_600:
            raise InvalidRequest("An expiry (1 to 36600 days) is for a grant only")
        fields["expires_in_days"] = str(days)
        lines.append(f"They expire in {days} days (unused ones are written off then).")
    return Plan(f"{verb} this account?", lines, fields, f"/console/accounts/{row.id}")


async def _plan_status(
    state: AppState, work: UnitOfWork, form: dict[str, str], suspend: bool
) -> Plan:
    row = await _account(work, form)
    reason = form.get("reason", "").strip()[:500]
    after = "suspended" if suspend else "active"
    lines = [f"Account: {_who(row)}", f"Status: {row.status} → {after}"]
    if suspend:
        lines.append("Its charges and holds will be refused (403) until it is reactivated.")
        if reason:
            lines.append(f"Reason (shown in its credit checks): {reason}")
    return Plan(
        "Suspend this account?" if suspend else "Reactivate this account?",
        lines,
        {"account_id": row.id, "reason": reason} if suspend else {"account_id": row.id},
        f"/console/accounts/{row.id}",
        danger=suspend,
    )


async def _plan_erase(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    row = await _account(work, form)
    return Plan(
        "Erase this account's personal data?",
        [
            f"Account: {_who(row)}",
            "Erased: its identity (kept only as a keyed digest), email, display name, status "
            "reason, the email on its purchases, its charges' descriptions and metadata.",
            "The ledger and every amount stay. This cannot be undone.",
        ],
        {"account_id": row.id},
        f"/console/accounts/{row.id}",
        danger=True,
    )


async def _plan_revoke_portal_links(
    state: AppState, work: UnitOfWork, form: dict[str, str]
) -> Plan:
    row = await _account(work, form)
    return Plan(
        "Revoke this account's portal links?",
        [
            f"Account: {_who(row)}",
            "Every portal link made for it until now stops working (a link sent to the wrong "
            "person, or leaked). Its next credit check answers a new one.",
        ],
        {"account_id": row.id},
        f"/console/accounts/{row.id}",
    )


async def _plan_refund(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    payment_id = _required(form, "payment_id", "The payment")
    purchase = await queries.purchase(await work.connection(), payment_id)
    if purchase is None:
        raise InvalidRequest(f"No purchase with payment {payment_id}")
    left = int(purchase.amount_minor) - int(purchase.refunded_minor)
    text = form.get("amount_minor", "").strip()
    amount = left if not text else _int(form, "amount_minor", "The amount")
    if amount <= 0 or amount > left:
        raise InvalidRequest(f"The amount must be between 1 and {left} (minor units left)")
    total = int(purchase.refunded_minor) + amount
    uses = refunds.uses_for_refund(int(purchase.uses), int(purchase.amount_minor), total) - int(
        purchase.uses_refunded
    )
    return Plan(
        "Refund this purchase?" if amount < left else "Refund this purchase in full?",
        [
            f"Payment: {payment_id} ({api_status(purchase.status)}, "
            f"{format_price(int(purchase.amount_minor), purchase.currency)} "
            f"for {purchase.uses} uses)",
            f"Refund now: {format_price(amount, purchase.currency)} "
            f"(of {format_price(left, purchase.currency)} not yet refunded)",
            f"Paid uses taken back: up to {uses} (never below zero; a shortfall is recorded)",
            f"The money goes back through the payment provider ({state.provider.name}).",
        ],
        {
            "payment_id": payment_id,
            "amount_minor": str(amount),
            "reason": form.get("reason", "").strip()[:500],
        },
        f"/console/accounts/{purchase.account_id}",
        danger=True,
    )


async def _plan_release(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    reservation_id = _required(form, "reservation_id", "The reservation")
    held = await queries.reservation(await work.connection(), reservation_id)
    if held is None:
        raise InvalidRequest(f"No reservation {reservation_id}")
    return Plan(
        "Release this hold?",
        [
            f"Reservation: {reservation_id} ({held.status}, {held.uses} uses)",
            "Its uses go back to the account now; a later capture of it is refused.",
        ],
        {"reservation_id": reservation_id},
        f"/console/accounts/{held.account_id}",
    )


async def _plan_void_lot(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    lot_id = _required(form, "lot_id", "The lot")
    lot = await queries.lot(await work.connection(), lot_id)
    if lot is None:
        raise InvalidRequest(f"No lot {lot_id}")
    reason = form.get("reason", "").strip()[:500]
    return Plan(
        "Void this lot?",
        [
            f"Lot: {lot_id} ({lot.kind}, {lot.left} of {lot.uses_granted} uses left, {lot.status})",
            "What it has left is voided now (one `void` ledger row); uses held by open "
            "reservations stay theirs. This cannot be undone.",
            *([f"Reason (on the ledger row): {reason}"] if reason else []),
        ],
        {"lot_id": lot_id, "reason": reason},
        f"/console/accounts/{lot.account_id}",
        danger=True,
    )


async def _plan_replay(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    event_row = _required(form, "event", "The event")
    conn = await work.connection()
    stored = await queries.event(conn, event_row)
    if stored is None:
        raise InvalidRequest(f"No stored event {event_row}")
    account_id = await queries.account_of_payment(conn, stored.payment_id)
    return Plan(
        "Replay this webhook event?",
        [
            f"Event: {stored.event_id} ({stored.type}), {stored.attempts} attempts so far"
            + (f", last error {stored.last_error}" if stored.last_error else ""),
            "The payment is fetched from the provider again and applied exactly once.",
        ],
        {"event": event_row},
        f"/console/accounts/{account_id}" if account_id else "/console/webhooks",
    )


async def _plan_reconcile(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    payment_id = _required(form, "payment_id", "The payment")
    purchase = await queries.purchase(await work.connection(), payment_id)
    if purchase is None:
        raise InvalidRequest(f"No purchase with payment {payment_id}")
    return Plan(
        "Reconcile this purchase with the provider?",
        [
            f"Payment: {payment_id} ({api_status(purchase.status)})",
            "The provider is asked for the payment; a paid one is credited exactly once.",
        ],
        {"payment_id": payment_id},
        f"/console/accounts/{purchase.account_id}",
    )


async def _plan_create_key(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    name = _required(form, "name", "A name")[:100]
    scope = form.get("scope", "")
    if scope not in auth.SCOPES:
        raise InvalidRequest(f"Choose a scope: {', '.join(auth.SCOPES)}")
    return Plan(
        "Create this API key?",
        [
            f"Name: {name}",
            f"Scope: {scope}"
            + (" (everything, this console included)" if scope == "admin" else ""),
            "Its secret is shown once, on the next page.",
        ],
        {"name": name, "scope": scope},
        "/console/keys",
        danger=scope == "admin",
    )


async def _plan_revoke_key(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    key_id = _required(form, "key_id", "The key")
    return Plan(
        "Revoke this API key?",
        [
            f"Key: {key_id}",
            f"Requests with it are refused within {state.settings.api_key_cache_seconds:g} s; "
            "console sessions opened with it end at once.",
        ],
        {"key_id": key_id},
        "/console/keys",
        danger=True,
    )


async def _plan_endpoint(
    state: AppState, work: UnitOfWork, form: dict[str, str], enabled: bool
) -> Plan:
    endpoint_id = _required(form, "endpoint_id", "The endpoint")
    try:
        endpoint = await endpoints.get(await work.connection(), endpoint_id)
    except BillingError:
        raise InvalidRequest(f"No webhook endpoint {endpoint_id}") from None
    lines = [f"Endpoint: {endpoint.url} ({endpoint.status})"]
    if enabled:
        lines.append("Its deliveries start again; its run of failures is forgotten.")
    else:
        lines.append("No more deliveries to it until it is enabled; its events are kept.")
    return Plan(
        "Enable this endpoint?" if enabled else "Disable this endpoint?",
        lines,
        {"endpoint_id": endpoint_id},
        "/console/endpoints",
        danger=not enabled,
    )


async def _enable_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_endpoint(state, work, form, True)


async def _disable_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_endpoint(state, work, form, False)


async def _plan_resend(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    endpoint_id = _required(form, "endpoint_id", "The endpoint")
    delivery_id = _required(form, "delivery_id", "The delivery")
    return Plan(
        "Resend this delivery?",
        [
            f"Delivery: {delivery_id} (endpoint {endpoint_id})",
            "The same event (the same webhook-id) is sent again at the next delivery run.",
        ],
        {"endpoint_id": endpoint_id, "delivery_id": delivery_id},
        "/console/endpoints",
    )


async def _suspend_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_status(state, work, form, True)


async def _reactivate_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_status(state, work, form, False)


def _amount(form: dict[str, str]) -> int | None:
    text = form.get("amount_minor", "").strip()
    return int(text) if text else None


ACTIONS: dict[str, tuple[Planner, Runner]] = {
    "grant": (
        _plan_grant,
        lambda st, w, s, f, r: actions.grant(
            w,
            st.pricing,
            s.operator,
            f["account_id"],
            int(f["uses"]),
            f["reason"],
            r,
            int(f["expires_in_days"]) if f.get("expires_in_days") else None,
        ),
    ),
    "suspend": (
        _suspend_plan,
        lambda st, w, s, f, r: actions.set_status(
            w, s.operator, f["account_id"], True, f.get("reason"), r
        ),
    ),
    "reactivate": (
        _reactivate_plan,
        lambda st, w, s, f, r: actions.set_status(w, s.operator, f["account_id"], False, None, r),
    ),
    "erase": (
        _plan_erase,
        lambda st, w, s, f, r: actions.erase(w, s.operator, f["account_id"], r),
    ),
    "revoke_portal_links": (
        _plan_revoke_portal_links,
        lambda st, w, s, f, r: actions.revoke_portal_links(w, s.operator, f["account_id"], r),
    ),
    "refund": (
        _plan_refund,
        lambda st, w, s, f, r: actions.refund(
            w, st.provider, s.operator, f["payment_id"], _amount(f), f.get("reason") or None, r
        ),
    ),
    "release": (
        _plan_release,
        lambda st, w, s, f, r: actions.release(w, s.operator, f["reservation_id"], r),
    ),
    "void_lot": (
        _plan_void_lot,
        lambda st, w, s, f, r: actions.void_lot(w, s.operator, f["lot_id"], f.get("reason"), r),
    ),
    "replay": (
        _plan_replay,
        lambda st, w, s, f, r: actions.replay(w, st.provider, s.operator, f["event"], r),
    ),
    "reconcile": (
        _plan_reconcile,
        lambda st, w, s, f, r: actions.reconcile(w, st.provider, s.operator, f["payment_id"], r),
    ),
    "disable_endpoint": (
        _disable_plan,
        lambda st, w, s, f, r: actions.set_endpoint(w, s.operator, f["endpoint_id"], False, r),
    ),
    "enable_endpoint": (
        _enable_plan,
        lambda st, w, s, f, r: actions.set_endpoint(w, s.operator, f["endpoint_id"], True, r),
    ),
    "resend_delivery": (
        _plan_resend,
        lambda st, w, s, f, r: actions.resend_delivery(
            w, s.operator, f["endpoint_id"], f["delivery_id"], r
        ),
    ),
    "create_key": (
        _plan_create_key,
        lambda st, w, s, f, r: actions.create_key(
            w, s.operator, f["name"], frozenset({f["scope"]}), r
        ),
    ),
    "revoke_key": (
        _plan_revoke_key,
        lambda st, w, s, f, r: actions.revoke_key(w, s.operator, f["key_id"], r),
    ),
    **CATALOG_ACTIONS,
    "set_rate": (rates.plan_set_rate, rates.set_rate),
}


@router.post("/{action}")
async def act(action: str, request: Request, state: StateDep, work: UnitOfWorkDep) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    try:
        form = await form_of(request)
        check_csrf(session, form)
    except BillingError as exc:
        return problem(exc, session)
    if action not in ACTIONS:
        return problem(InvalidRequest(f"No action {action}"), session, back="/console")
    planner, runner = ACTIONS[action]
    try:
        plan = await planner(state, work, form)
    except BillingError as exc:
        return problem(exc, session, back="/console")
    secret = state.secrets.console_secret
    if form.get("confirm") != "yes":
        request_id = secrets.token_urlsafe(24)
        return page(
            "console_confirm.html",
            session,
            action=action,
            plan=plan,
            request_id=request_id,
            confirmation=confirmations.issue(
                secret, session.csrf_token, action, plan.fields, request_id
            ),
            nav="",
        )
    request_id = form.get("request_id", "")
    # Only a Confirm of a confirmation page this session was shown, for exactly these fields.
    if not confirmations.valid(
        secret, form.get("confirmation"), session.csrf_token, action, plan.fields, request_id
    ):
        refused = CsrfRefused(
            "This confirmation was not issued for this action (or it expired); start again"
        )
        return problem(refused, session, back=plan.back)
    try:
        done = await runner(state, work, session, plan.fields, request_id)
    except BillingError as exc:
        # Nothing of the failed action is kept (its unit of work rolls back on the way out).
        await work.rollback()
        return problem(exc, session, back=plan.back, title="The action was not done")
    if done.secret is not None:
        return render(
            "console_key_created.html",
            session=session,
            secret=done.secret,
            name=plan.fields["name"],
            scope=plan.fields["scope"],
            nav="keys",
        )
    return redirect(plan.back, notice=done.entry_id)
