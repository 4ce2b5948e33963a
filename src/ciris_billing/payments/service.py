"""Purchases: create one with the provider, and apply what the provider says about it.

`apply_payment` is the one place a payment turns into uses. The webhook inbox and `reconcile`
both call it with the payment as fetched from the provider (never the event body), so the
order in which events arrive does not matter and a payment is credited exactly once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, select, true
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts.service import Identity, ensure_account, plan_with_paid_uses
from ciris_billing.autotopup import cards
from ciris_billing.autotopup.outcomes import after_payment
from ciris_billing.catalog import codes, offers
from ciris_billing.catalog.packs import DEFAULT_PACK
from ciris_billing.db import accounts, auto_topups, new_id, purchases, utcnow
from ciris_billing.errors import PurchaseNoLongerPayable, PurchaseNotYetRecorded
from ciris_billing.events.outbox import PURCHASE_FAILED, PURCHASE_SUCCEEDED, record_event
from ciris_billing.ledger.wallet import Credit, NewLot, add_lot
from ciris_billing.observability import PURCHASES, log
from ciris_billing.payments import refunds
from ciris_billing.payments.providers.base import (
    PURCHASE_ID_KEY,
    PaymentIntent,
    PaymentProvider,
    PaymentResult,
)

# Re-exported: callers look purchases up through the service.
from ciris_billing.payments.purchases import Offer as Offer
from ciris_billing.payments.purchases import api_status as api_status
from ciris_billing.payments.purchases import find_purchase as find_purchase
from ciris_billing.payments.purchases import get_purchase as get_purchase
from ciris_billing.payments.purchases import record_purchase as record_purchase
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import UnitOfWork

# The provider of a purchase a promotion code made free: no payment, credited at once.
FREE_PROVIDER = "promotion"

# A purchase in one of these states will not change by itself any more (reconcile skips it).
FINAL_STATUSES = ("succeeded", "canceled")


def scoped_key(api_key_id: str, idempotency_key: str) -> str:
    """A client's idempotency key as its API key's own (SPEC.md: keys are scoped to the API
    key), for ids and provider keys derived from it: a digest, so its length is bounded."""
    digest = hashlib.sha256(f"{api_key_id}\x00{idempotency_key}".encode()).hexdigest()
    return f"{api_key_id}:{digest[:32]}"


def purchase_id_for(idempotency_key: str | None) -> str:
    """The local purchase id. From the client's key when it has one, so a retried request
    asks the provider with the same idempotency key and gets the same payment back."""
    if idempotency_key is None:
        return new_id("pur")
    return "pur_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class StartedPurchase:
    purchase: Row[Any]  # the purchase row, as recorded
    payment: PaymentResult  # the provider's payment (its client secret pays it)
    offer: Offer


@dataclass(frozen=True, slots=True)
class PurchaseOrder:
    identity: Identity
    customer_email: str | None
    # Already scoped to who asked: an API key's (scoped_key) or a buy link's ("buy:..."), so
    # two API keys using one key never find each other's purchase.
    idempotency_key: str | None
    pack_id: str | None = None  # the catalog's pack (None: the default pack)
    promotion_code: str | None = None


async def start_purchase(
    work: UnitOfWork, provider: PaymentProvider, pricing: Pricing, order: PurchaseOrder
) -> StartedPurchase:
    """Start buying one offer: the one way a purchase begins (the API and the buy link).

    Create the provider's payment, then record the purchase row in the unit of work. With an
    idempotency key the purchase id is derived from it, so a retry finds the purchase it
    already recorded (and its payment, from the provider) instead of starting another; a retry
    racing the first call asks the provider with the same idempotency key, and the purchase id
    is unique, so both record one row. No transaction is open while the provider answers.
    """
    purchase_id = purchase_id_for(order.idempotency_key)
    if order.idempotency_key is not None:
        conn = await work.connection()
        existing = (
            await conn.execute(select(purchases).where(purchases.c.id == purchase_id))
        ).first()
        if existing is not None:
            async with work.provider_call():
                payment = await provider.get_payment(existing.payment_id)
            if payment is None:
                raise PurchaseNoLongerPayable("The provider no longer knows this purchase")
            offer = Offer(
                int(existing.amount_minor),
                existing.currency,
                int(existing.uses),
                existing.pack_id or DEFAULT_PACK,
                existing.lot_expires_in_days,
                existing.promotion_code,
                int(existing.discount_minor),
            )
            return StartedPurchase(existing, payment, offer)
    account, _ = await ensure_account(await work.connection(), order.identity, pricing)
    conn = await work.connection()
    pack = await offers.pack_to_buy(conn, pricing, account, order.pack_id)
    offer = Offer(pack.price_minor, pack.currency, pack.uses, pack.pack_id, pack.expires_in_days)
    if order.promotion_code is not None:
        # Counted in this transaction, committed with it before the provider is asked (so
        # racing purchases see it): exact by construction (catalog/codes.py redeem).
        code = await codes.redeem(conn, order.promotion_code, account.id, pack.pack_id, purchase_id)
        paid = code.price_after(pack.price_minor)
        offer = replace(
            offer,
            amount_minor=paid,
            promotion_code=code.code,
            discount_minor=pack.price_minor - paid,
        )
        if offer.amount_minor == 0:
            return await _grant_free(conn, purchase_id, account.id, offer, order)
    metadata = {"pack_id": offer.pack_id}
    if offer.promotion_code is not None:
        metadata["promotion_code"] = offer.promotion_code
    try:
        # Whose card is kept if the payer asks to at confirmation (made once per account).
        customer_id = await cards.customer_for(work, provider, account.id)
        # The account (if new) commits before the call: it is valid on its own.
        async with work.provider_call():
            payment = await provider.create_payment_intent(
                PaymentIntent(
                    amount_minor=offer.amount_minor,
                    currency=offer.currency,
                    purchase_id=purchase_id,
                    account_id=account.id,
                    idempotency_key=f"purchase-{purchase_id}",
                    customer_email=order.customer_email,
                    customer_id=customer_id,
                    metadata=metadata,
                )
            )
    except Exception:
        if offer.promotion_code is not None:
            # No payment, no purchase: the redemption (committed before the call) goes back.
            async with work.engine.begin() as undo:
                await codes.give_back(undo, offer.promotion_code, purchase_id)
        raise
    purchase = await record_purchase(
        await work.connection(),
        purchase_id=purchase_id,
        account_id=account.id,
        provider=provider.name,
        payment=payment,
        offer=offer,
        customer_email=order.customer_email,
    )
    return StartedPurchase(purchase, payment, offer)


async def _grant_free(
    conn: AsyncConnection, purchase_id: str, account_id: str, offer: Offer, order: PurchaseOrder
) -> StartedPurchase:
    """A promotion code brought the price to 0: the purchase is recorded as paid with no
    payment (provider "promotion") and credited now, as a paid lot with cost basis 0."""
    payment = PaymentResult(
        payment_id=purchase_id,
        state="succeeded",
        amount_minor=0,
        currency=offer.currency,
        provider_status="succeeded",
        metadata={PURCHASE_ID_KEY: purchase_id},
    )
    purchase = await record_purchase(
        conn,
        purchase_id=purchase_id,
        account_id=account_id,
        provider=FREE_PROVIDER,
        payment=payment,
        offer=offer,
        customer_email=order.customer_email,
    )
    await credit_purchase(conn, purchase)
    credited = await get_purchase(conn, FREE_PROVIDER, purchase_id)
    return StartedPurchase(credited, payment, offer)


async def credit_purchase(conn: AsyncConnection, purchase: Row[Any]) -> bool:
    """Add the purchase's uses to its account, exactly once. True if this call credited it.

    The credits row carries the payment id in `external_transaction_id`, which is unique: of
    any number of concurrent or repeated attempts, only one INSERT can succeed, and only that
    one adds the uses, in the same transaction.
    """
    now = utcnow()
    # The one lock order of money in and out: the purchase's row, then its account's (refunds and
    # disputes take them so too); without it a credit racing a refund of this purchase deadlocks.
    await conn.execute(
        select(purchases.c.id).where(purchases.c.id == purchase.id).with_for_update()
    )
    # The purchase's paid lot (its price over its uses is the cost basis), once: the credits
    # row's unique external id refuses a second. An auto top-up's purchase is one like any
    # other; its lot says where it came from.
    topup = await conn.scalar(
        select(auto_topups.c.id).where(auto_topups.c.purchase_id == purchase.id)
    )
    credited = await add_lot(
        conn,
        purchase.account_id,
        NewLot(
            kind="paid",
            uses=purchase.uses,
            source="purchase" if topup is None else "auto_topup",
            amount_minor=purchase.amount_minor,
            purchase_id=purchase.id,
            pack_id=purchase.pack_id,
            # The pack's lot expiry, as it was when the purchase began.
            expires_at=None
            if purchase.lot_expires_in_days is None
            else now + timedelta(days=purchase.lot_expires_in_days),
        ),
        Credit(
            kind="purchase",
            currency=purchase.currency,
            description=f"Purchase of {purchase.uses} uses",
            external_transaction_id=purchase.payment_id,
            amount_minor=purchase.amount_minor,
        ),
        at=now,
    )
    if credited is not None:
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == purchase.account_id)
            .values(
                # A first purchase moves the account off the free plan; an app's own plan
                # name stays.
                plan_name=plan_with_paid_uses(),
                updated_at=now,
            )
        )
        await conn.execute(
            purchases.update()
            .where(purchases.c.id == purchase.id)
            .values(status="succeeded", failure_message=None, credited_at=now, updated_at=now)
        )
        # Once: only the transaction whose credit row was inserted gets here.
        await record_event(
            conn, purchase.account_id, PURCHASE_SUCCEEDED, purchase_data(purchase, "succeeded")
        )
    return credited is not None


def purchase_data(purchase: Any, status: str) -> dict[str, Any]:
    """A purchase event's own data."""
    return {
        "purchase_id": purchase.id,
        "payment_id": purchase.payment_id,
        "provider": purchase.provider,
        "amount_minor": int(purchase.amount_minor),
        "currency": purchase.currency,
        "uses": int(purchase.uses),
        "status": status,
        # The catalog (issue 24): the pack bought, and the promotion code that priced it.
        "pack_id": purchase.pack_id or DEFAULT_PACK,
        "promotion_code": purchase.promotion_code,
    }


async def apply_payment(conn: AsyncConnection, provider: str, payment: PaymentResult) -> str:
    """Bring the purchase in line with the payment as the provider reports it now.

    Returns the outcome: credited, already_credited, failed, status_updated, amount_mismatch,
    not_ours. Raises PurchaseNotYetRecorded for our payment whose purchase is not visible yet.
    """
    purchase = await find_purchase(conn, provider, payment.payment_id)
    if purchase is None:
        if payment.metadata.get(PURCHASE_ID_KEY):
            raise PurchaseNotYetRecorded("The purchase for this payment is not recorded yet; retry")
        return "not_ours"
    claimed = payment.metadata.get(PURCHASE_ID_KEY)
    if claimed is not None and claimed != purchase.id:
        log.error(
            "payment_purchase_mismatch", payment_id=payment.payment_id, purchase_id=purchase.id
        )
        return "purchase_mismatch"
    now = utcnow()
    if payment.state == "succeeded":
        if (
            payment.amount_minor != purchase.amount_minor
            or payment.currency.upper() != purchase.currency
        ):
            log.error(
                f"{provider}_payment_amount_mismatch",
                payment_id=payment.payment_id,
                expected_minor=purchase.amount_minor,
                paid_minor=payment.amount_minor,
                paid_currency=payment.currency,
            )
            return "amount_mismatch"
        outcome = "already_credited"
        if await credit_purchase(conn, purchase):
            PURCHASES.labels(provider, "succeeded").inc()
            log.info(
                f"{provider}_payment_credited",
                payment_id=payment.payment_id,
                purchase_id=purchase.id,
                account_id=purchase.account_id,
                uses=purchase.uses,
            )
            outcome = "credited"
            # In the crediting transaction, once: the card the payer asked to keep becomes the
            # auto top-up card; a top-up this purchase paid is done.
            await cards.keep_saved_card(conn, provider, purchase, payment)
            await after_payment(conn, purchase, payment, credited=True)
        if payment.amount_refunded_minor > purchase.refunded_minor and (
            await refunds.apply_refunded_total(
                conn, purchase.id, payment.amount_refunded_minor, source="provider"
            )
        ):
            PURCHASES.labels(provider, "refunded").inc()
            outcome = "refunded" if outcome == "already_credited" else "credited_and_refunded"
        return outcome
    if purchase.credited_at is not None:
        return "already_credited"  # a late failure never undoes a success
    failed = payment.state == "failed"
    # Safe: a failure is reported once. The UPDATE moves a purchase not yet failed (nor
    # credited) to its new status; racing handlers of one failure wait on its row lock, then
    # find it failed already and change nothing.
    moved = await conn.execute(
        purchases.update()
        .where(
            purchases.c.id == purchase.id,
            purchases.c.credited_at.is_(None),
            purchases.c.status.is_distinct_from(payment.state) if failed else true(),
        )
        .values(status=payment.state, failure_message=payment.failure_message, updated_at=now)
        .returning(purchases.c.id)
    )
    if failed and moved.first() is not None:
        await record_event(
            conn, purchase.account_id, PURCHASE_FAILED, purchase_data(purchase, "failed")
        )
    if payment.state in ("failed", "canceled"):
        await after_payment(conn, purchase, payment, credited=False)
    if failed:
        PURCHASES.labels(provider, "failed").inc()
        log.info(
            f"{provider}_payment_failed", payment_id=payment.payment_id, purchase_id=purchase.id
        )
        return "failed"
    return "status_updated"


async def open_purchases(conn: AsyncConnection, provider: str) -> list[Row[Any]]:
    result = await conn.execute(
        select(purchases)
        .where(purchases.c.provider == provider, purchases.c.status.not_in(FINAL_STATUSES))
        .order_by(purchases.c.created_at)
    )
    return list(result)


async def reconcile_purchase(work: UnitOfWork, provider: PaymentProvider, payment_id: str) -> str:
    """One step of `reconcile`: bring a purchase in line with its payment at the provider (as a
    webhook would), e.g. credit a paid one whose webhook never came. Returns the outcome."""
    async with work.provider_call():
        payment = await provider.get_payment(payment_id)
    if payment is None:
        return "unknown_payment"
    return await apply_payment(await work.connection(), provider.name, payment)


async def confirm_paid(work: UnitOfWork, provider: str, payment: PaymentResult) -> str:
    """The payer's page (or the agent client) was told by the provider that the payment
    succeeded and asks us to confirm: with `payment` as the provider reports it to us (never
    the caller's word), credit it now, exactly as its webhook would (apply_payment: once, under
    the unique credit). If the provider says it succeeded, the purchase is first marked seen
    paid in a transaction of its own, so that if this request dies before crediting, the
    background reconcile asks about it at its next run instead of RECONCILE_AFTER_SECONDS
    later (issue 22 item 4)."""
    if payment.state == "succeeded":
        async with work.engine.begin() as conn:
            # Safe any number of times, beside anything: it only sets a mark, once.
            await conn.execute(
                purchases.update()
                .where(
                    purchases.c.provider == provider,
                    purchases.c.payment_id == payment.payment_id,
                    purchases.c.paid_seen_at.is_(None),
                )
                .values(paid_seen_at=utcnow())
            )
    return await apply_payment(await work.connection(), provider, payment)
