"""What a credit check and a charge answer: status, body, headers, metrics and log events.

The one place both are answered: the framework's routes (routes.py) and the fast path
(hot/asgi.py) call these functions with the validated body, once the API key is authorized, so
the two can never answer differently. This is the edge for idempotency too: a charge's
fingerprint is computed here from the validated request (the business layer gets it as a value).

A charge is its own unit of work: one atomic statement through the charge store (charges.py),
never a request-scoped transaction; a check is one read. Errors are raised, and rendered by
errors_http.py for both callers.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ciris_billing import idempotency
from ciris_billing.accounts import charges, checks
from ciris_billing.accounts.schemas import ChargeCreate, CreditCheck
from ciris_billing.accounts.service import Identity
from ciris_billing.auth import Principal
from ciris_billing.catalog.offers import offers_for
from ciris_billing.checkout.links import buy_token, buy_url
from ciris_billing.deps import AppState, json_response, take_limits
from ciris_billing.errors import PurchaseRequired
from ciris_billing.observability import CHARGES, CREDIT_CHECKS, log
from ciris_billing.portal.links import Scope, portal_token, portal_url

CHECK_ROUTE = "/v1/billing/credits/check"
CHARGE_ROUTE = "/v1/billing/charges"
REPLAYED = {"Idempotent-Replayed": "true"}


def portal_link(
    state: AppState, request: Request, identity: Identity, scope: Scope = "read"
) -> str:
    """The user's portal (balance, usage, receipts; with `write`, auto top-up too): a sealed
    link (portal/links.py, about 4 us to make). A read key's requests get `read` links."""
    token = portal_token(
        state.secrets.portal_link_secret,
        identity.oauth_provider,
        identity.external_id,
        scope,
        lifetime_seconds=state.settings.portal_link_seconds,
    )
    return portal_url(state.public_base_url(request), token)


async def check(
    state: AppState,
    request: Request,
    body: CreditCheck,
    key_limit_due: str | None = None,
    *,
    may_write: bool = False,
) -> Response:
    """May this user go on? Creates the account (with its free uses) on first sight."""
    identity = Identity(body.oauth_provider, body.external_id)
    await take_limits(state, identity.oauth_provider, identity.external_id, key_limit_due)
    status = await checks.check_credit(state.account_reader, state.engine, identity, state.pricing)
    CREDIT_CHECKS.labels("true" if status.purchase_required else "false").inc()
    # The link does what the key may: a read key's check gets a link that only shows.
    link = portal_link(state, request, identity, "write" if may_write else "read")
    return json_response(200, check_answer(status, link))


def check_answer(status: checks.CreditStatus, portal_url: str) -> dict[str, Any]:
    """A credit check's body; a charge's `next_check` is the same."""
    answer: dict[str, Any] = {
        "has_credit": status.has_credit,
        "credits_remaining": status.credits_remaining,
        "plan_name": status.plan_name,
        "reason": status.reason,
        "free_uses_remaining": status.free_uses_remaining,
        "total_uses": status.total_uses,
        "held_uses": status.held_uses,
        "purchase_required": status.purchase_required,
        "next_expiry": status.next_expiry,
    }
    if status.purchase_required:
        answer["purchase_price_minor"] = status.purchase_price_minor
        answer["purchase_uses"] = status.purchase_uses
    answer["portal_url"] = portal_url
    return answer


async def charge(
    state: AppState,
    request: Request,
    body: ChargeCreate,
    key_header: str | None,
    principal: Principal,
    key_limit_due: str | None = None,
) -> Response:
    """Record a use: 201 (replayed: Idempotent-Replayed), 402 with where to buy, 403, 409.
    `principal` is the authenticated API key: its idempotency keys are its own."""
    key = idempotency.resolve_key(key_header, body.idempotency_key)
    identity = Identity(body.oauth_provider, body.external_id)
    await take_limits(state, identity.oauth_provider, identity.external_id, key_limit_due)
    currency = body.currency or state.pricing.currency
    # A rated charge: its feature's rate (the process's rate book: no read per request).
    rate = None if body.feature is None else await state.rate_book.rate(body.feature)
    uses = body.uses if rate is None or body.quantity is None else rate.uses_for(body.quantity)
    fingerprint = None
    if key is not None:
        # What makes a retry "the same request": the route and the validated charge.
        payload = {
            "oauth_provider": identity.oauth_provider,
            "external_id": identity.external_id,
            "uses": body.uses,
            "amount_minor": body.amount_minor,
            "currency": currency,
            "description": body.description,
            "metadata": body.metadata,
        }
        if body.feature is not None:  # a plain charge keeps the fingerprint it had
            payload |= {"uses": None, "feature": body.feature, "quantity": body.quantity}
        fingerprint = idempotency.fingerprint("POST", CHARGE_ROUTE, payload)
    wanted = charges.ChargeRequest(
        identity=identity,
        uses=uses,
        amount_minor=body.amount_minor,
        currency=currency,
        description=body.description,
        metadata=body.metadata,
        idempotency_key=key,
        fingerprint=fingerprint,
        api_key_id=principal.key_id,
        currency_named=body.currency is not None,
        rate=rate,
        quantity=body.quantity,
    )
    try:
        made = await charges.charge(
            wanted, store=state.charge_store, engine=state.engine, pricing=state.pricing
        )
    except PurchaseRequired as refused:
        CHARGES.labels("False").inc()
        log.info("charge_refused_purchase_required", oauth_provider=identity.oauth_provider)
        # Where the user can buy more: a signed, expiring link (no database write on a 402).
        token = buy_token(state.link_secret, identity.oauth_provider, identity.external_id)
        refused.extra["checkout_url"] = buy_url(state.public_base_url(request), token)
        refused.extra["portal_url"] = portal_link(state, request, identity, "write")
        # The packs the account's plan may buy (the guide's fields above are the default's).
        refused.extra["offers"] = await offers_for(state.engine, state.pricing, identity)
        raise
    except Exception:
        CHARGES.labels("False").inc()
        raise
    CHARGES.labels("True").inc()
    if not made.replayed:
        log.info(
            "charge_created",
            charge_id=made.charge_id,
            account_id=made.account_id,
            uses=made.uses,
            free_uses_used=made.free_uses_used,
            paid_uses_used=made.paid_uses_used,
        )
    answer = {
        "charge_id": made.charge_id,
        "account_id": made.account_id,
        "oauth_provider": identity.oauth_provider,
        "external_id": identity.external_id,
        "uses": made.uses,
        "free_uses_used": made.free_uses_used,
        "paid_uses_used": made.paid_uses_used,
        "amount_minor": made.amount_minor,
        "currency": made.currency,
        "description": made.description,
        "metadata": made.metadata,
        "free_uses_remaining": made.free_uses_remaining,
        "credits_remaining": made.credits_remaining,
        "balance_minor": made.credits_remaining,
        "total_uses": made.total_uses,
        "plan_name": made.plan_name,
        "created_at": made.created_at,
        "lots": made.lots,
    }
    if made.feature is not None:
        answer |= {"feature": made.feature, "quantity": made.quantity}
    if made.next_check is not None and _prefers_next_check(request):
        # What a check right after it answers (a charge needs a write key: a write link), so
        # the agent can skip that check (the clients ask for it). Only when asked: the guide's
        # answer is unchanged, and a replay (the original answer: none) never has it.
        link = portal_link(state, request, identity, "write")
        answer["next_check"] = check_answer(made.next_check, link)
        return json_response(201, answer, NEXT_CHECK_APPLIED)
    return json_response(201, answer, REPLAYED if made.replayed else None)


# RFC 7240: a request may state preferences (`Prefer: next-check`); the answer says which it
# applied.
NEXT_CHECK = "next-check"
NEXT_CHECK_APPLIED = {"Preference-Applied": NEXT_CHECK}


def _prefers_next_check(request: Request) -> bool:
    prefer = request.headers.get("prefer")
    return prefer is not None and NEXT_CHECK in (p.strip() for p in prefer.lower().split(","))
