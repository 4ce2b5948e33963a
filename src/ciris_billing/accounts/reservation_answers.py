"""What a hold and a capture answer: status, body, metrics and log events.

The one place both are answered: the framework's routes (reservation_routes.py) and the fast
path (hot/asgi.py) call these functions with the validated body, once the API key is
authorized, so the two can never answer differently (as answers.py does for checks and
charges).

A hold or a capture is first tried as ONE statement through the hot stores (hot/holds.py),
batched with those that wait; with an Idempotency-Key, that statement takes the key and the
answer is recorded with it in the same transaction, before the commit (as run_idempotent
does). Whatever that statement does not make — an unknown account, too few
uses, suspended, a reservation that is not held or expired, more uses than held, a key already
used — is answered in a unit of work of its own by accounts/reservations.py (through
run_idempotent: replays and 409s), which says why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import reservations, service
from ciris_billing.accounts.answers import portal_link
from ciris_billing.accounts.checks import open_account
from ciris_billing.accounts.hot.holds import CaptureAttempt, HoldAttempt, Keyed
from ciris_billing.accounts.schemas import ReservationCapture, ReservationCreate
from ciris_billing.auth import Principal
from ciris_billing.catalog.offers import offers_in
from ciris_billing.checkout.links import buy_token, buy_url
from ciris_billing.db import iso, new_id, utcnow
from ciris_billing.deps import AppState, json_response, run_idempotent, take_limits
from ciris_billing.errors import PurchaseRequired
from ciris_billing.observability import RESERVATIONS, log
from ciris_billing.unit_of_work import unit_of_work

RESERVE_ROUTE = "/v1/billing/reservations"
CAPTURE_ROUTE = "/v1/billing/reservations/{reservation_id}/capture"


def _fields(row: Any) -> Mapping[str, Any]:
    """A row's columns by name: a SQLAlchemy row, a driver record or a dict."""
    mapping: Mapping[str, Any] = getattr(row, "_mapping", row)
    return mapping


def reservation_body(reservation: Any, account: Any) -> dict[str, Any]:
    """A reservation and its account's available counters (`reservation`, `account`: rows, or
    one joined row for both)."""
    r, a = _fields(reservation), _fields(account)
    captured = r["captured_uses"]
    return {
        "reservation_id": r["id"],
        "account_id": r["account_id"],
        "oauth_provider": a["oauth_provider"],
        "external_id": a["external_id"],
        "status": r["status"],
        "uses": int(r["uses"]),
        "captured_uses": None if captured is None else int(captured),
        "charge_id": r["charge_id"],
        "expires_at": iso(r["expires_at"]),
        "metadata": dict(r["metadata"]),
        **_rated(r),
        "held_uses": reservations.held_uses(a),
        "free_uses_remaining": int(a["free_uses_remaining"]),
        "credits_remaining": int(a["paid_uses_remaining"]),
        "total_uses": int(a["total_uses"]),
        "created_at": iso(r["created_at"]),
    }


def capture_body(charge: Any, account: Any, held: Any) -> dict[str, Any]:
    """The charge a capture made, with the hold (`held`: its id and uses) and the account."""
    c, a, h = _fields(charge), _fields(account), _fields(held)
    return {
        "charge_id": c["id"],
        "reservation_id": h["id"],
        "status": "captured",
        "account_id": a["id"],
        "oauth_provider": a["oauth_provider"],
        "external_id": a["external_id"],
        "uses": int(c["uses"]),
        "released_uses": int(h["uses"]) - int(c["uses"]),
        "free_uses_used": int(c["free_uses_used"]),
        "paid_uses_used": int(c["paid_uses_used"]),
        "amount_minor": int(c["amount_minor"]),
        "currency": c["currency"],
        "description": c["description"],
        "metadata": dict(c["metadata"]),
        "free_uses_remaining": int(a["free_uses_remaining"]),
        "credits_remaining": int(a["paid_uses_remaining"]),
        "balance_minor": int(a["paid_uses_remaining"]),
        "held_uses": reservations.held_uses(a),
        "total_uses": int(a["total_uses"]),
        "plan_name": a["plan_name"],
        "created_at": iso(c["created_at"]),
        "lots": [
            {"lot_id": lot_id, "uses": int(uses)}
            for lot_id, uses in zip(c["lot_ids"] or [], c["lot_uses"] or [], strict=True)
        ],
        **_rated(c),
    }


def _rated(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `carry` hold's (or its capture's) feature and quantity; nothing for one of uses."""
    feature = row.get("feature")
    return {} if feature is None else {"feature": feature, "quantity": int(row["quantity"])}


def _held(reservation_id: str, account_id: str, body: ReservationCreate) -> None:
    RESERVATIONS.labels("held").inc()
    log.info(
        "reservation_held",
        reservation_id=reservation_id,
        account_id=account_id,
        uses=body.uses,
        ttl_seconds=body.ttl_seconds,
    )


def _captured(reservation_id: str, charge_id: str, account_id: str, uses: int, held: int) -> None:
    RESERVATIONS.labels("captured").inc()
    log.info(
        "reservation_captured",
        reservation_id=reservation_id,
        charge_id=charge_id,
        account_id=account_id,
        uses=uses,
        released_uses=held - uses,
    )


def _fingerprint(request: Request, body: ReservationCreate | ReservationCapture) -> str:
    """As run_idempotent computes it, so either path finds the other's key."""
    return idempotency.fingerprint(request.method, request.url.path, _payload(body))


def _payload(body: ReservationCreate | ReservationCapture) -> dict[str, Any]:
    """The body as fingerprinted: a hold or capture in uses keeps the fingerprint it had
    before rates."""
    if isinstance(body, ReservationCreate):
        rated = body.feature is not None
        return body.model_dump(mode="json", exclude=None if rated else {"feature", "quantity"})
    return body.model_dump(mode="json", exclude=None if body.quantity is not None else {"quantity"})


async def _rated_hold(
    state: AppState, body: ReservationCreate
) -> tuple[ReservationCreate, reservations.CarryRate | None]:
    """A hold by feature and quantity as a hold of uses: ceil(quantity / units_per_use) by
    either rate. With `up` that is its charge; with `carry` it is what the quantity can
    complete whatever the account carries (the remainder is below one use), and the hold
    keeps its feature, quantity and rate for the capture (reservations.py)."""
    if body.feature is None or body.quantity is None:
        return body, None
    rate = await state.rate_book.rate(body.feature)
    held = body.model_copy(update={"uses": rate.uses_for(body.quantity)})
    if rate.rounding != "carry":
        return held, None
    return held, reservations.CarryRate(body.feature, body.quantity, rate.units_per_use)


def _text(body: dict[str, Any]) -> str:
    """An answer's JSON text, as json_response and run_idempotent write it."""
    return json.dumps(body, separators=(",", ":"))


def _json_text(text: str) -> Response:
    return Response(content=text, status_code=201, media_type="application/json")


async def reserve(
    state: AppState,
    request: Request,
    body: ReservationCreate,
    key_header: str | None,
    principal: Principal,
    key_limit_due: str | None = None,
) -> Response:
    """Hold uses (free ones first): 201 with the hold; 402 with where to buy; 403; 409.
    `key_limit_due`: the API key whose rate limit is still to be taken (deps.take_limits)."""
    key = idempotency.resolve_key(key_header)
    identity = service.Identity(body.oauth_provider, body.external_id)
    await take_limits(state, identity.oauth_provider, identity.external_id, key_limit_due)
    asked = body
    body, carry = await _rated_hold(state, body)
    now = utcnow()
    attempt = HoldAttempt(
        oauth_provider=identity.oauth_provider,
        external_id=identity.external_id,
        uses=body.uses,
        reservation_id=new_id("rsv"),
        api_key_id=principal.key_id,
        metadata_json=json.dumps(body.metadata, separators=(",", ":")),
        at=now,
        expires_at=now + timedelta(seconds=body.ttl_seconds),
    )

    def answer(account: Any) -> dict[str, Any]:
        """The hold's answer from the statement's row (the account after the hold)."""
        reservation = {
            "id": attempt.reservation_id,
            "account_id": account["account_id"],
            "status": reservations.HELD,
            "uses": body.uses,
            "captured_uses": None,
            "charge_id": None,
            "expires_at": attempt.expires_at,
            "metadata": body.metadata,
            "created_at": now,
        }
        counters = {
            **account,
            "oauth_provider": identity.oauth_provider,
            "external_id": identity.external_id,
        }
        return reservation_body(reservation, counters)

    # A `carry` hold keeps its rate: only the framework's path below writes it.
    fast = carry is None
    if fast and key is None:
        made = await state.hold_store.hold(attempt)
        if made is not None:
            _held(attempt.reservation_id, made["account_id"], body)
            return json_response(201, answer(made))
    elif fast and key is not None:
        keyed = Keyed(key, _fingerprint(request, asked), lambda row: (201, _text(answer(row))))
        recorded = await state.hold_store.hold_keyed(attempt, keyed)
        if recorded is not None:
            _held(attempt.reservation_id, recorded[0]["account_id"], body)
            return _json_text(recorded[1])

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        wanted = reservations.HoldRequest(
            identity=identity,
            uses=body.uses,
            ttl_seconds=body.ttl_seconds,
            metadata=body.metadata,
            api_key_id=principal.key_id,
            idempotency_key=key,
            carry=carry,
        )
        try:
            made = await reservations.hold(conn, wanted, state.pricing)
        except PurchaseRequired as refused:
            RESERVATIONS.labels("refused").inc()
            token = buy_token(state.link_secret, identity.oauth_provider, identity.external_id)
            refused.extra["checkout_url"] = buy_url(state.public_base_url(request), token)
            refused.extra["portal_url"] = portal_link(state, request, identity, "write")
            # The packs the account's plan may buy (the guide's fields are the default's).
            refused.extra["offers"] = await offers_in(conn, state.pricing, identity)
            raise
        _held(made.reservation.id, made.account.id, body)
        return 201, reservation_body(made.reservation, made.account)

    async with unit_of_work(state.engine) as work:
        if await service.find_account(await work.connection(), identity) is None:
            # As a check would: in a unit of work of its own (committed), so the account stays
            # even when this hold is refused. Safe when first requests race (ensure_account).
            await open_account(state.engine, identity, state.pricing)
        return await run_idempotent(request, work, principal, key, _payload(asked), effect)


async def capture(
    state: AppState,
    request: Request,
    reservation_id: str,
    body: ReservationCapture,
    key_header: str | None,
    principal: Principal,
    key_limit_due: str | None = None,
) -> Response:
    """Charge the uses the interaction took (all by default) as one charge and release the
    rest: 201; 404; 409 (expired, captured or released, key reused); 422 (more than held).
    `key_limit_due`: the API key whose rate limit is still to be taken (no account limit:
    the hold took it)."""
    if key_limit_due is not None:
        await state.key_limits.check(key_limit_due, "API key")
    key = idempotency.resolve_key(key_header)
    attempt = CaptureAttempt(
        reservation_id=reservation_id,
        uses=body.uses,
        charge_id=new_id("ch"),
        at=utcnow(),
        amount_minor=body.amount_minor,
        description=body.description,
        metadata_json=json.dumps(body.metadata, separators=(",", ":")),
        api_key_id=principal.key_id,
        credit_id=new_id("cr"),
    )

    def answer(made: Any) -> dict[str, Any]:
        """The capture's answer from the statement's row (the account after it)."""
        charge = {
            "id": attempt.charge_id,
            "uses": made["captured_uses"],
            "free_uses_used": made["free_used"],
            "paid_uses_used": made["paid_used"],
            "amount_minor": body.amount_minor,
            "currency": made["currency"],
            "description": body.description,
            # As the framework's capture: the hold's metadata, then the capture's.
            "metadata": {**json.loads(made["held_metadata"]), **body.metadata},
            "created_at": attempt.at,
            "lot_ids": made["lot_ids"],
            "lot_uses": made["lot_uses"],
        }
        account = {**made, "id": made["account_id"]}
        return capture_body(charge, account, {"id": reservation_id, "uses": made["held_uses_of"]})

    def captured(made: Any) -> None:
        uses, held = int(made["captured_uses"]), int(made["held_uses_of"])
        _captured(reservation_id, attempt.charge_id, made["account_id"], uses, held)

    # A `carry` hold's capture goes the framework's path below (the statements make no row
    # for a `carry` hold, whether or not the capture names a quantity).
    fast = body.quantity is None
    if fast and key is None:
        made = await state.capture_store.capture(attempt)
        if made is not None:
            captured(made)
            return json_response(201, answer(made))
    elif fast and key is not None:
        keyed = Keyed(key, _fingerprint(request, body), lambda row: (201, _text(answer(row))))
        recorded = await state.capture_store.capture_keyed(attempt, keyed)
        if recorded is not None:
            captured(recorded[0])
            return _json_text(recorded[1])

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        wanted = reservations.CaptureRequest(
            reservation_id=reservation_id,
            uses=body.uses,
            amount_minor=body.amount_minor,
            description=body.description,
            metadata=body.metadata,
            api_key_id=principal.key_id,
            quantity=body.quantity,
        )
        made = await reservations.capture(conn, wanted)
        charge, account, held = made.charge, made.account, made.reservation
        assert charge is not None
        _captured(held.id, charge.id, account.id, int(charge.uses), int(held.uses))
        return 201, capture_body(charge, account, held)

    async with unit_of_work(state.engine) as work:
        return await run_idempotent(request, work, principal, key, _payload(body), effect)
