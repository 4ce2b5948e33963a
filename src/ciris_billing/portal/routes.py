"""The customer portal: `GET /v1/billing/portal/{token}` and its receipts. Public (the sealed
link is the credential, portal/links.py): a tampered or revoked link is 404, an expired one
410, a read-only link cannot change anything (403), and a link shows only the account it names
(a receipt of another account's payment is a 404, as if it did not exist).

What it shows: the balance (free, paid, held), the usage history (each charge: time,
description, uses; paged by key), purchases with their receipts (amount, date, and the card's
brand and last 4 as the payment provider reports them, asked when the receipt is opened),
refunds, and a link to buy more (the buy link, which starts a purchase on the payment page).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import Row, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts import lots
from ciris_billing.accounts.service import Identity, find_account
from ciris_billing.autotopup import cards
from ciris_billing.autotopup.routes import auto_topup_body
from ciris_billing.catalog.offers import offer_bodies, offered_packs
from ciris_billing.checkout.links import buy_token, buy_url
from ciris_billing.console.queries import decode_cursor, encode_cursor
from ciris_billing.console.web import form_of
from ciris_billing.db import charges, credits, purchases, utcnow
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep
from ciris_billing.errors import BillingError, InvalidRequest
from ciris_billing.observability import log
from ciris_billing.payments.purchases import api_status
from ciris_billing.portal import receipt_pdf
from ciris_billing.portal.links import (
    PortalLinkExpired,
    PortalLinkInvalid,
    portal_url,
    read_portal_token,
    still_valid,
)
from ciris_billing.rates.usage import usage_by_feature
from ciris_billing.unit_of_work import UnitOfWork
from ciris_billing.web.templating import PAGE_HEADERS, render

router = APIRouter(prefix="/v1/billing/portal", include_in_schema=False)

USAGE_PAGE = 25
# What a buyer sees of a purchase's status (a payment never finished is not a receipt).
RECEIPT_STATUSES = ("succeeded", "partially_refunded", "refunded")


def _refused(status_code: int) -> Response:
    expired = status_code == 410
    return render(
        "portal_problem.html",
        status_code=status_code,
        title="This link has expired" if expired else "This link does not work",
        message=(
            "Portal links last a limited time. Ask the app you use for a new one."
            if expired
            else "Check that you copied the whole link, or ask the app you use for a new one."
        ),
    )


async def _account_of(
    state: AppState, work: Any, token: str, write: bool = False
) -> Row[Any] | Response:
    """The link's account; 404 (not ours, revoked, account gone), 410 (expired), 403 for an
    action that changes the account through a read-only link."""
    try:
        link = read_portal_token(state.secrets.portal_link_secret, token)
    except PortalLinkExpired:
        return _refused(410)
    except PortalLinkInvalid:
        return _refused(404)
    conn = await work.connection()
    account = await find_account(conn, Identity(link.oauth_provider, link.external_id))
    if account is None or not await still_valid(conn, account.id, link):
        return _refused(404)
    if write and not link.may_write:
        return render(
            "portal_problem.html",
            status_code=403,
            title="This link only shows your account",
            message="Changing auto top-up or the saved card needs the link from the account "
            "page of the app you use.",
        )
    return account


def _may_write(state: AppState, token: str) -> bool:
    return read_portal_token(state.secrets.portal_link_secret, token).may_write


@router.get("/{token}")
async def portal(
    token: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    before: Annotated[str | None, Query(max_length=200)] = None,
    notice: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    account = await _account_of(state, work, token)
    if isinstance(account, Response):
        return account
    conn = await work.connection()
    usage, older = await _usage(conn, account.id, before)
    by_feature = await usage_by_feature(conn, account.id)
    bought = list(
        await conn.execute(
            select(purchases)
            .where(purchases.c.account_id == account.id, purchases.c.status.in_(RECEIPT_STATUSES))
            .order_by(purchases.c.created_at.desc())
            .limit(100)
        )
    )
    refunded = list(
        await conn.execute(
            select(credits)
            .where(credits.c.account_id == account.id, credits.c.kind == "refund")
            .order_by(credits.c.created_at.desc())
            .limit(100)
        )
    )
    topup = await auto_topup_body(conn, state.pricing, state.settings, account)
    expiring = lots.next_expiry(account, utcnow())
    may_write = _may_write(state, token)
    base = state.public_base_url(request)
    here = portal_url(base, token)
    buy = buy_url(base, buy_token(state.link_secret, account.oauth_provider, account.external_id))
    # The catalog: the packs the account's plan offers, each with its own buy link.
    offers = [
        {**offer, "buy_url": f"{buy}?pack_id={offer['pack_id']}"}
        for offer in offer_bodies(await offered_packs(conn, state.pricing, account))
    ]
    return render(
        "portal.html",
        a=account,
        usage=usage,
        by_feature=by_feature,
        older=f"{here}?before={older}#usage" if older else None,
        newest=f"{here}#usage" if before else None,
        purchases=bought,
        refunds=refunded,
        status=api_status,
        token=token,
        buy_url=buy,
        offer=state.pricing,
        offers=offers,
        topup=topup,
        expiring=None
        if expiring is None
        else {"uses": expiring[0], "on": f"{expiring[1].day} {expiring[1]:%b %Y}"},
        may_write=may_write,
        notice=NOTICES.get(notice or ""),
    )


async def _usage(
    conn: AsyncConnection, account_id: str, before: str | None
) -> tuple[list[Row[Any]], str | None]:
    """A page of the account's charges, newest first, after the cursor (keyset paging)."""
    query = select(charges).where(charges.c.account_id == account_id)
    after = decode_cursor(before)
    if after is not None:
        query = query.where(tuple_(charges.c.created_at, charges.c.id) < after)
    rows = list(
        await conn.execute(
            query.order_by(charges.c.created_at.desc(), charges.c.id.desc()).limit(USAGE_PAGE + 1)
        )
    )
    if len(rows) <= USAGE_PAGE:
        return rows, None
    rows = rows[:USAGE_PAGE]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)


# What the portal says after a change (a fixed set: nothing from the URL is shown as is).
NOTICES = {
    "topup_on": "Auto top-up is on.",
    "topup_off": "Auto top-up is off.",
    "card_removed": "Your saved card was removed; auto top-up is off.",
}


@router.post("/{token}/auto-topup")
async def switch_auto_topup(
    token: str, request: Request, state: StateDep, work: UnitOfWorkDep
) -> Response:
    """Auto top-up on or off (autotopup.cards.set_enabled, as the API). No other credential
    than the link: its signed token is in the path, which another site cannot know, so a
    forged form cannot name it (the token does what a CSRF token does)."""
    account = await _account_of(state, work, token, write=True)
    if isinstance(account, Response):
        return account
    try:
        form = await form_of(request)
        enabled = {"on": True, "off": False}.get(form.get("auto_topup", ""))
        if enabled is None:
            raise InvalidRequest("auto_topup must be on or off")
        await cards.set_enabled(await work.connection(), account.id, enabled)
    except BillingError as exc:
        await work.rollback()
        return _problem(exc, token)
    log.info("auto_topup_switched", account_id=account.id, enabled=enabled, by="portal")
    return _back(token, "topup_on" if enabled else "topup_off")


@router.post("/{token}/card")
async def remove_saved_card(
    token: str, request: Request, state: StateDep, work: UnitOfWorkDep
) -> Response:
    """Remove the saved card (autotopup.cards.remove_card: auto top-up off, the provider
    forgets the card), after a confirmation page."""
    account = await _account_of(state, work, token, write=True)
    if isinstance(account, Response):
        return account
    try:
        form = await form_of(request)
    except BillingError as exc:
        return _problem(exc, token)
    if form.get("confirm") != "yes":
        found = await cards.settings_of(await work.connection(), account.id)
        return render(
            "portal_confirm.html",
            card_brand=found.card_brand if found else None,
            card_last4=found.card_last4 if found else None,
            action=f"/v1/billing/portal/{token}/card",
            back=f"/v1/billing/portal/{token}#auto-topup",
        )
    try:
        await cards.remove_card(work, state.provider, account.id)
    except BillingError as exc:
        await work.rollback()
        return _problem(exc, token)
    return _back(token, "card_removed")


def _back(token: str, notice: str) -> Response:
    return Response(
        status_code=303,
        headers={
            "Location": f"/v1/billing/portal/{token}?notice={notice}#auto-topup",
            **PAGE_HEADERS,
        },
    )


def _problem(exc: BillingError, token: str) -> Response:
    return render(
        "portal_problem.html",
        status_code=exc.status_code,
        title="That did not work",
        message=exc.detail,
        back=f"/v1/billing/portal/{token}#auto-topup",
    )


async def _receipt_of(
    state: AppState, work: UnitOfWork, token: str, payment_id: str
) -> tuple[Row[Any], Any] | Response:
    """The link's own purchase with this payment id (else the refusal to answer) and what the
    provider says of its payment (the card)."""
    account = await _account_of(state, work, token)
    if isinstance(account, Response):
        return account
    found = (
        await (await work.connection()).execute(
            select(purchases).where(
                purchases.c.payment_id == payment_id,
                purchases.c.account_id == account.id,  # only this link's own account
                purchases.c.status.in_(RECEIPT_STATUSES),
            )
        )
    ).first()
    if found is None:
        return _refused(404)
    payment = None
    if found.provider == state.provider.name:  # not one a promotion code made free (no card)
        async with work.provider_call():
            payment = await state.provider.get_payment(payment_id)
    return found, payment


@router.get("/{token}/receipts/{payment_id}")
async def receipt(token: str, payment_id: str, state: StateDep, work: UnitOfWorkDep) -> Response:
    found = await _receipt_of(state, work, token, payment_id)
    if isinstance(found, Response):
        return found
    purchase, payment = found
    return render(
        "portal_receipt.html",
        p=purchase,
        card_brand=payment.card_brand if payment else None,
        card_last4=payment.card_last4 if payment else None,
        status=api_status,
        back=f"/v1/billing/portal/{token}",
        pdf=f"/v1/billing/portal/{token}/receipts/{payment_id}/pdf",
    )


@router.get("/{token}/receipts/{payment_id}/pdf")
async def receipt_as_pdf(
    token: str, payment_id: str, state: StateDep, work: UnitOfWorkDep
) -> Response:
    """The receipt as a PDF download (portal/receipt_pdf.py)."""
    found = await _receipt_of(state, work, token, payment_id)
    if isinstance(found, Response):
        return found
    purchase, payment = found
    refunds = await (await work.connection()).execute(
        select(credits.c.created_at, credits.c.amount_minor)
        .where(
            credits.c.account_id == purchase.account_id,
            credits.c.kind == "refund",
            credits.c.external_transaction_id.like(f"{payment_id}:refunded:%"),
        )
        .order_by(credits.c.created_at)
    )
    facts = receipt_pdf.ReceiptFacts(
        seller_name=state.settings.seller_name,
        seller_address=state.settings.seller_address,
        payment_id=purchase.payment_id,
        paid_at=purchase.credited_at or purchase.created_at,
        pack=receipt_pdf.purchase_pack(purchase),
        amount_minor=int(purchase.amount_minor),
        discount_minor=receipt_pdf.purchase_discount(purchase),
        currency=purchase.currency,
        card_brand=payment.card_brand if payment else None,
        card_last4=payment.card_last4 if payment else None,
        refunds=tuple(receipt_pdf.Refund(r.created_at, int(r.amount_minor)) for r in refunds),
    )
    return Response(
        receipt_pdf.receipt_pdf(facts),
        media_type="application/pdf",
        headers={
            **PAGE_HEADERS,
            "Content-Disposition": f'attachment; filename="receipt-{purchase.payment_id}.pdf"',
        },
    )
