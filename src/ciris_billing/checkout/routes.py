"""The public payment page: `GET /v1/billing/checkout/{payment_id}` and what it loads.

No API key anywhere: the page is static (the same bytes for every purchase, no secret and no
purchase data in it); its script reads the client secret from the URL fragment and asks
`GET .../checkout/{payment_id}/summary` with `X-Client-Secret`. The summary is answered only
when that secret equals the payment's client secret at the provider (constant-time compare);
otherwise it is a 404 that does not say whether the payment exists.

Headers: `Cache-Control: no-store` and `Referrer-Policy: no-referrer` on the page and the
summary, and a Content-Security-Policy with no `'unsafe-inline'`: script and style come from
this service (`assets/checkout.js`, `assets/checkout.css`), plus js.stripe.com in Stripe mode.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from functools import lru_cache
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from ciris_billing.accounts.service import Identity
from ciris_billing.catalog.offers import offer_bodies, offered_packs, offers_in
from ciris_billing.catalog.packs import DEFAULT_PACK
from ciris_billing.checkout.links import buy_token, buy_url, checkout_url, read_buy_token
from ciris_billing.checkout.schemas import AutoTopupOffer, CheckoutSummary
from ciris_billing.db import accounts
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep, json_response
from ciris_billing.errors import (
    CheckoutNotFound,
    ErrorOut,
    PurchaseNoLongerPayable,
    error_responses,
)
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers.base import PaymentResult
from ciris_billing.unit_of_work import UnitOfWork

router = APIRouter(prefix="/v1/billing", tags=["checkout"])

# Provider payment ids (`pi_...`, `pi_sbx_...`): anything else is not worth a lookup.
_PAYMENT_ID = re.compile(r"[A-Za-z0-9_]{1,255}")
MAX_CLIENT_SECRET_LENGTH = 200

# Stripe's published needs for Stripe.js and the Payment Element.
STRIPE_JS_URL = "https://js.stripe.com/v3/"
_STRIPE_SCRIPT = ("https://js.stripe.com", "https://*.js.stripe.com")
_STRIPE_FRAME = ("https://js.stripe.com", "https://*.js.stripe.com", "https://hooks.stripe.com")
_STRIPE_CONNECT = ("https://api.stripe.com", "https://*.stripe.com")
_STRIPE_IMG = ("https://*.stripe.com",)

# Stripe's zero-decimal and three-decimal currencies; the rest have two minor digits.
_ZERO_DECIMAL = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
_THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])
_SYMBOLS = {
    "USD": "$",
    "EUR": "€",
    "GBP": "£",
    "JPY": "¥",
    "INR": "₹",
    "CAD": "CA$",
    "AUD": "A$",
    "NZD": "NZ$",
}


def format_price(amount_minor: int, currency: str) -> str:
    """`500, "USD"` → `$5.00`; `500, "JPY"` → `¥500`; unknown symbols → `5.00 CHF`."""
    code = currency.upper()
    digits = 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2
    amount = f"{amount_minor / 10**digits:,.{digits}f}"
    symbol = _SYMBOLS.get(code)
    return f"{symbol}{amount}" if symbol else f"{amount} {code}"


def content_security_policy(provider: str) -> str:
    stripe = provider == "stripe"
    directives = {
        "default-src": ["'none'"],
        "script-src": ["'self'", *(_STRIPE_SCRIPT if stripe else ())],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", *(_STRIPE_IMG if stripe else ())],
        "connect-src": ["'self'", *(_STRIPE_CONNECT if stripe else ())],
        "frame-src": list(_STRIPE_FRAME) if stripe else ["'none'"],
        "form-action": ["'none'"],  # the card form is sent by script, never by the browser
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


PRIVATE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def page_headers(provider: str) -> dict[str, str]:
    return {
        **PRIVATE_HEADERS,
        "Content-Security-Policy": content_security_policy(provider),
        "X-Frame-Options": "DENY",
        "X-Robots-Tag": "noindex",
    }


@lru_cache
def _asset(name: str) -> str:
    return files("ciris_billing.checkout").joinpath(name).read_text(encoding="utf-8")


@lru_cache
def asset_version() -> str:
    """Changes with the script or style, so a browser never runs a stale one."""
    digest = hashlib.sha256()
    for name in ("checkout.js", "checkout.css"):
        digest.update(_asset(name).encode())
    return digest.hexdigest()[:16]


@lru_cache
def page_html(provider: str) -> str:
    """The page for this provider. Nothing here depends on the purchase or on any secret."""
    stripe_js = f'<script src="{STRIPE_JS_URL}" defer></script>' if provider == "stripe" else ""
    return (
        _asset("page.html")
        .replace("@@PROVIDER@@", "stripe" if provider == "stripe" else "sandbox")
        .replace("@@STRIPE_JS@@", stripe_js)
        .replace("@@VERSION@@", asset_version())
    )


def _static(name: str, media_type: str) -> Response:
    return Response(
        content=_asset(name),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/checkout/assets/checkout.js", include_in_schema=False)
async def checkout_script() -> Response:
    return _static("checkout.js", "text/javascript; charset=utf-8")


@router.get("/checkout/assets/checkout.css", include_in_schema=False)
async def checkout_style() -> Response:
    return _static("checkout.css", "text/css; charset=utf-8")


@router.get("/checkout/{payment_id}", include_in_schema=False)
async def checkout_page(payment_id: str, state: StateDep) -> Response:
    """The payment page (public). Its link carries the client secret as `#cs=...`."""
    del payment_id  # read by the page's script; the HTML is the same for every purchase
    return Response(
        content=page_html(state.provider.name),
        media_type="text/html; charset=utf-8",
        headers=page_headers(state.provider.name),
    )


ClientSecretHeader = Annotated[
    str | None,
    Header(alias="X-Client-Secret", description="The purchase's payment client secret"),
]


@router.get(
    "/checkout/{payment_id}/summary",
    response_model=CheckoutSummary,
    responses={
        404: {"model": ErrorOut, "description": "Unknown payment or wrong secret"},
        **error_responses(422),
    },
)
async def checkout_summary(
    payment_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    client_secret: ClientSecretHeader = None,
) -> Response:
    """What the payment page shows: the offer, the payment's status and the account's balance.

    No API key: the payment's client secret (sent as `X-Client-Secret`) is the credential.
    """
    payment = await _verified(state, work, payment_id, client_secret)
    # Read after the secret was checked, and fresh: the page polls this for the balance.
    return await _summary_answer(request, state, work, payment)


@router.post(
    "/checkout/{payment_id}/sync",
    response_model=CheckoutSummary,
    responses={
        404: {"model": ErrorOut, "description": "Unknown payment or wrong secret"},
        **error_responses(422, 502, 503),
    },
)
async def checkout_sync(
    payment_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    client_secret: ClientSecretHeader = None,
) -> Response:
    """The page was told by the provider that the payment succeeded: the service asks the
    provider itself and, if paid, credits the purchase now (once, as its webhook would: a
    webhook lost to a fault no longer makes the payer wait for reconciliation). The summary
    after it. No API key: the payment's client secret (`X-Client-Secret`) is the credential."""
    payment = await _verified(state, work, payment_id, client_secret)
    await payments.confirm_paid(work, state.provider.name, payment)
    return await _summary_answer(request, state, work, payment)


async def _summary_answer(
    request: Request, state: AppState, work: UnitOfWork, payment: PaymentResult
) -> Response:
    conn = await work.connection()
    purchase = await payments.get_purchase(conn, state.provider.name, payment.payment_id)
    account = (
        await conn.execute(select(accounts).where(accounts.c.id == purchase.account_id))
    ).one()
    offer = AutoTopupOffer(
        uses=int(purchase.uses),
        amount_minor=int(purchase.amount_minor),
        price=format_price(int(purchase.amount_minor), purchase.currency),
        # The threshold in force once this purchase is paid (a free plan's alerts wait for it).
        threshold_uses=(
            int(account.low_balance_threshold_uses)
            if account.low_balance_threshold_uses is not None
            else state.settings.low_balance_threshold_uses
        ),
        max_per_month=state.settings.auto_topup_max_per_month,
    )
    summary = _summary(state, purchase, account, payment.provider_status, offer)
    summary["pack_id"] = purchase.pack_id or DEFAULT_PACK
    # The account's other packs, each with its own buy link (the payer may choose another).
    link = buy_url(
        state.public_base_url(request),
        buy_token(state.link_secret, account.oauth_provider, account.external_id),
    )
    summary["offers"] = [
        {**offer, "price": format_price(offer["price_minor"], offer["currency"]),
         "buy_url": f"{link}?pack_id={offer['pack_id']}"}
        for offer in offer_bodies(await offered_packs(conn, state.pricing, account))
    ]  # fmt: skip
    return json_response(200, summary, PRIVATE_HEADERS)


async def _verified(
    state: AppState, work: UnitOfWork, payment_id: str, client_secret: str | None
) -> PaymentResult:
    """The payment, when `client_secret` is its client secret at the provider (constant-time
    compare); else CheckoutNotFound, which does not say whether the payment exists."""
    if (
        not client_secret
        or len(client_secret) > MAX_CLIENT_SECRET_LENGTH
        or not _PAYMENT_ID.fullmatch(payment_id)
    ):
        raise _not_found()
    purchase = await payments.find_purchase(
        await work.connection(), state.provider.name, payment_id
    )
    if purchase is None:
        raise _not_found()
    async with work.provider_call():
        payment = await state.provider.get_payment(payment_id)
    if (
        payment is None
        or payment.client_secret is None
        or not secrets.compare_digest(payment.client_secret.encode(), client_secret.encode())
    ):
        raise _not_found()
    return payment


def _not_found() -> CheckoutNotFound:
    return CheckoutNotFound("No such checkout (unknown payment, or wrong client secret)")


def account_label(oauth_provider: str, external_id: str) -> str:
    """Which account the uses go to, as the payment page shows it: enough for its owner to
    recognize it (and anyone else to see it is not theirs), not the identity itself:
    `oauth:google/bob@example.com` -> `b•••@example.com (google)`."""
    name, at, domain = external_id.partition("@")
    masked = f"{name[:1]}•••{at}{domain}" if at else f"{external_id[:2]}•••"
    provider = oauth_provider.removeprefix("oauth:")
    return f"{masked} ({provider})"


def _summary(
    state: AppState, purchase: Any, account: Any, payment_status: str, offer: AutoTopupOffer
) -> dict[str, Any]:
    uses = int(purchase.uses)
    return CheckoutSummary(
        payment_id=purchase.payment_id,
        uses=uses,
        uses_purchased=uses,
        amount_minor=int(purchase.amount_minor),
        currency=purchase.currency,
        price=format_price(int(purchase.amount_minor), purchase.currency),
        status=payments.api_status(purchase.status),
        payment_status=payment_status,
        credited=purchase.credited_at is not None,
        failure_message=purchase.failure_message,
        free_uses_remaining=int(account.free_uses_remaining),
        credits_remaining=int(account.paid_uses_remaining),
        provider=state.provider.name,
        publishable_key=state.provider.publishable_key,
        account_label=account_label(account.oauth_provider, account.external_id),
        auto_topup=offer,
    ).model_dump(mode="json")


@router.get(
    "/buy/{token}",
    status_code=303,
    responses={
        404: {"model": ErrorOut, "description": "Invalid or expired link"},
        **error_responses(422, 502, 503),
    },
)
async def buy(
    token: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    pack_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = None,
) -> Response:
    """Public: the `checkout_url` of a 402 answer. Starts a purchase for the link's identity
    (the same one each time the link is opened) and redirects to its payment page. `pack_id`:
    one of the account's offers (default: the default pack if offered, else the first offer)."""
    named = read_buy_token(state.link_secret, token) if len(token) <= 2048 else None
    if named is None:
        raise CheckoutNotFound("This buy link is invalid or has expired; ask for a new one")
    identity = Identity(*named)
    if pack_id is None:
        offered = [
            o["pack_id"] for o in await offers_in(await work.connection(), state.pricing, identity)
        ]
        if offered and DEFAULT_PACK not in offered:
            pack_id = offered[0]
    # The signed token (identity + expiry) and the pack are the key: reopening or
    # double-clicking one link finds its purchase; a new 402 mints a new link and so a new
    # purchase.
    key = "buy:" + hashlib.sha256(f"{token}\x00{pack_id or ''}".encode()).hexdigest()
    order = payments.PurchaseOrder(
        identity, customer_email=None, idempotency_key=key, pack_id=pack_id
    )
    try:
        started = await payments.start_purchase(work, state.provider, state.pricing, order)
    except PurchaseNoLongerPayable:
        raise CheckoutNotFound("This purchase can no longer be paid; ask for a new link") from None
    payment = started.payment
    if not payment.client_secret:
        raise CheckoutNotFound("This purchase can no longer be paid; ask for a new link")
    target = checkout_url(state.public_base_url(request), payment.payment_id, payment.client_secret)
    return Response(status_code=303, headers={"Location": target, **PRIVATE_HEADERS})
