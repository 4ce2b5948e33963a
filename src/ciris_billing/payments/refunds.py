"""Refunds: money going back takes the refunded share of the uses back, exactly once.

Refunds are applied as a cumulative total: the provider reports how much of a payment has
been refunded in all, and `apply_refunded_total` moves the purchase's `refunded_minor` forward
to it under the purchase's row lock. Whether the refund came through our API, Stripe's
dashboard (a `charge.refunded` webhook) or both, in any order, each refunded amount is taken
back once: a second path finds nothing left to apply. The ledger row's external id names the
new total, so even two racing writers could not both record it.

Refunds and disputes (SPEC.md): a purchase with an open dispute cannot be refunded here (409,
as Stripe refuses), nor one whose dispute was lost (the bank already gave the money back). A
refund that arrives anyway (made in the provider's dashboard, told by its webhook) takes no
use while the purchase has an open or lost dispute: the purchase's unused uses are in the
dispute's hold (removed if lost; a won dispute releases only the uses still unrefunded,
disputes.py), and every paid use left on the account belongs to another purchase. Its uses are
recorded as shortfall. So, whatever the order, the uses taken back never exceed the purchase's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, credits, disputes, purchases, utcnow
from ciris_billing.errors import RefundExceedsPayment, RefundNotAllowed
from ciris_billing.events.outbox import REFUND_SUCCEEDED, record_available_change, record_event
from ciris_billing.ledger import moves
from ciris_billing.ledger.moves import held_of_lot, left_of, purchase_lot
from ciris_billing.ledger.wallet import lock_wallet
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.payments.purchases import api_status, get_purchase
from ciris_billing.unit_of_work import UnitOfWork


@dataclass(frozen=True, slots=True)
class RefundApplied:
    amount_minor: int  # money refunded by this step
    uses_reversed: int  # paid uses taken back from the account
    shortfall_uses: int  # uses that should have gone back but were already spent


def uses_for_refund(uses: int, amount_minor: int, refunded_minor: int) -> int:
    """The refunded share of a purchase's uses, rounded up (a 1-cent refund takes a use)."""
    return -(-uses * refunded_minor // amount_minor)


# A dispute in one of these states keeps the purchase's uses (held, or removed when lost).
CLAIMING_DISPUTE_STATES = ("open", "lost")


async def claiming_disputes(conn: AsyncConnection, purchase_id: str) -> list[Row[Any]]:
    """The purchase's disputes that are open or lost (their holds cover its unused uses)."""
    result = await conn.execute(
        select(disputes).where(
            disputes.c.purchase_id == purchase_id,
            disputes.c.state.in_(CLAIMING_DISPUTE_STATES),
        )
    )
    return list(result)


def refundable_amount(
    purchase: Row[Any], requested_minor: int | None, claiming: list[Row[Any]] | None = None
) -> int:
    """What a refund request may refund, or a clear error."""
    for dispute in claiming or ():
        if dispute.state == "open":
            raise RefundNotAllowed(
                f"Purchase {purchase.payment_id} has an open dispute ({dispute.dispute_id}); "
                "it cannot be refunded until the dispute is closed"
            )
        raise RefundNotAllowed(
            f"Purchase {purchase.payment_id} was charged back (dispute {dispute.dispute_id} "
            "lost): the money already went back, it cannot be refunded"
        )
    if purchase.credited_at is None:
        raise RefundNotAllowed(
            f"Purchase {purchase.payment_id} is {api_status(purchase.status)}; "
            "only a paid one can be refunded"
        )
    left = int(purchase.amount_minor) - int(purchase.refunded_minor)
    amount = left if requested_minor is None else requested_minor
    if left <= 0:
        raise RefundExceedsPayment(f"Purchase {purchase.payment_id} is already fully refunded")
    if amount > left:
        raise RefundExceedsPayment(
            f"A refund of {amount} exceeds the {left} minor units left to refund"
        )
    return amount


async def apply_refunded_total(
    conn: AsyncConnection, purchase_id: str, refunded_total_minor: int, source: str
) -> RefundApplied | None:
    """Bring the purchase's refunds up to the provider's cumulative total (None: nothing new)."""
    # Row locks make this read-then-write safe: no other transaction can move this purchase's
    # or account's counters until we commit.
    purchase = (
        await conn.execute(select(purchases).where(purchases.c.id == purchase_id).with_for_update())
    ).one()
    total = min(refunded_total_minor, int(purchase.amount_minor))
    if total <= purchase.refunded_minor or purchase.credited_at is None:
        return None
    uses_target = uses_for_refund(int(purchase.uses), int(purchase.amount_minor), total)
    uses_due = uses_target - int(purchase.uses_refunded)
    # The account's row next (lock order: purchase, account): its wallet and counters cannot
    # move until we commit.
    wallet = await lock_wallet(conn, purchase.account_id)
    counters = (
        await conn.execute(
            select(accounts.c.reserved_paid_uses, accounts.c.refund_owed_uses).where(
                accounts.c.id == purchase.account_id
            )
        )
    ).one()
    # Read under the purchase's row lock, which apply_dispute takes first too: no dispute of
    # this purchase can open or close until we commit.
    claiming = await claiming_disputes(conn, purchase.id)
    # Only the purchase's own lot gives uses back (issue 23): what was spent there, or is held
    # by reservations, is shortfall. With an open or lost dispute, the lot's unused uses are
    # its hold (never taken here; a won dispute releases only what is still unrefunded), so
    # nothing is taken and the uses are recorded as shortfall.
    lot_id = await purchase_lot(conn, purchase.id)
    left = left_of(wallet, lot_id) if lot_id else 0
    take = 0 if claiming else min(uses_due, left)
    shortfall = uses_due - take
    # Of the shortfall, what reservations hold of this lot may still come back (a release or
    # an expiry instead of a capture): owed, and paid off before those uses return.
    held = (
        sum(uses for _, uses in await held_of_lot(conn, purchase.account_id, lot_id))
        if (lot_id and not claiming)
        else 0
    )
    owe = min(held, owed_from_holds(counters, shortfall))
    amount = total - int(purchase.refunded_minor)
    account = await moves.apply(
        conn,
        purchase.account_id,
        moves.Move(
            kind="refund",
            currency=purchase.currency,
            shortfall=shortfall,
            owed=owe,
            amount_minor=amount,
            external_transaction_id=f"{purchase.payment_id}:refunded:{total}",
            description=f"Refund of {amount} ({source})" + _shortfall_note(shortfall, claiming),
            lots={lot_id: -take} if lot_id and take else {},
        ),
        wallet=wallet,
    )
    if account is None:
        return None
    now = utcnow()
    await conn.execute(
        purchases.update()
        .where(purchases.c.id == purchase.id)
        .values(
            refunded_minor=total,
            uses_refunded=uses_target,
            status="refunded" if total == purchase.amount_minor else "partially_refunded",
            updated_at=now,
        )
    )
    log.info(
        f"{purchase.provider}_refund_applied",
        payment_id=purchase.payment_id,
        purchase_id=purchase.id,
        amount_minor=amount,
        uses_reversed=take,
        shortfall_uses=shortfall,
        source=source,
    )
    # Once per refunded amount: only the transaction whose ledger row was inserted gets here.
    await record_event(
        conn,
        purchase.account_id,
        REFUND_SUCCEEDED,
        {
            "purchase_id": purchase.id,
            "payment_id": purchase.payment_id,
            "amount_minor": amount,
            "currency": purchase.currency,
            "refunded_total_minor": total,
            "uses_reversed": take,
            "shortfall_uses": shortfall,
            "source": source,
        },
    )
    await record_available_change(conn, account, -take)
    return RefundApplied(amount, take, shortfall)


def owed_from_holds(account: Any, shortfall: int) -> int:
    """Of `shortfall` uses a refund or a lost dispute could not take, those reservations hold
    and that are not owed already (never more than the reserved paid uses). `account`: its
    row, locked by the caller."""
    room = int(account.reserved_paid_uses) - int(account.refund_owed_uses)
    return max(0, min(shortfall, room))


def _shortfall_note(shortfall: int, claiming: list[Row[Any]]) -> str:
    if not shortfall:
        return ""
    if claiming:
        dispute = claiming[0]
        return (
            f"; {shortfall} uses not taken: dispute {dispute.dispute_id} is {dispute.state}"
            " (its hold covers the purchase's unused uses)"
        )
    return f"; {shortfall} uses already spent or held by reservations"


async def refund_totals(conn: AsyncConnection, purchase: Row[Any]) -> tuple[int, int]:
    """(uses taken back, shortfall uses) over all of a purchase's refunds."""
    row = (
        await conn.execute(
            select(
                func.coalesce(func.sum(-credits.c.paid_uses_delta), 0).label("reversed"),
                func.coalesce(func.sum(credits.c.shortfall_uses), 0).label("shortfall"),
            ).where(
                credits.c.kind == "refund",
                credits.c.external_transaction_id.startswith(f"{purchase.payment_id}:refunded:"),
            )
        )
    ).one()
    return int(row.reversed), int(row.shortfall)


@dataclass(frozen=True, slots=True)
class MadeRefund:
    refund_id: str
    payment_id: str
    purchase_id: str
    amount_minor: int
    refunded_total_minor: int


async def make_refund(
    work: UnitOfWork,
    provider: PaymentProvider,
    payment_id: str,
    amount_minor: int | None,
    idempotency_key: str | None,
) -> MadeRefund:
    """Refund at the provider (no transaction is open while it answers)."""
    conn = await work.connection()
    purchase = await get_purchase(conn, provider.name, payment_id)
    # A dispute opening between this check and the provider's refund is safe: recording the
    # refund (apply_refunded_total, under the purchase's lock) then takes no use.
    amount = refundable_amount(purchase, amount_minor, await claiming_disputes(conn, purchase.id))
    async with work.provider_call():
        refund_id = await provider.refund_payment(payment_id, amount, idempotency_key)
        payment = await provider.get_payment(payment_id)
    # The provider's cumulative total, or at least what we just refunded (if its view lags).
    reported = payment.amount_refunded_minor if payment else 0
    total = max(reported, int(purchase.refunded_minor) + amount)
    return MadeRefund(refund_id, payment_id, purchase.id, amount, total)


async def record_refund(
    conn: AsyncConnection, provider: str, made: MadeRefund, reason: str | None
) -> dict[str, Any]:
    """Take the refund's uses back (unless its webhook already did) and describe the result."""
    await apply_refunded_total(conn, made.purchase_id, made.refunded_total_minor, source="api")
    purchase = await get_purchase(conn, provider, made.payment_id)
    reversed_uses, shortfall = await refund_totals(conn, purchase)
    return {
        "refund_id": made.refund_id,
        "payment_id": made.payment_id,
        "amount_minor": made.amount_minor,
        "currency": purchase.currency,
        "reason": reason,
        "purchase_status": api_status(purchase.status),
        "refunded_minor": int(purchase.refunded_minor),
        "uses_refunded": int(purchase.uses_refunded),
        "uses_reversed": reversed_uses,
        "shortfall_uses": shortfall,
    }
