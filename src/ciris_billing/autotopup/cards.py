"""Saved cards: the account's customer at the provider, the card a paid purchase saved, and the
account's auto top-up settings (on, off, card removed).

Only the provider's ids and what may be shown (brand, last 4 digits) are ever stored.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select, true
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import (
    auto_topup_settings,
    insert_or_ignore,
    payment_customers,
    utcnow,
)
from ciris_billing.errors import AutoTopupNeedsCard
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import PaymentProvider, PaymentResult
from ciris_billing.unit_of_work import UnitOfWork


async def customer_for(work: UnitOfWork, provider: PaymentProvider, account_id: str) -> str:
    """The account's customer at the provider, created once."""
    where = (payment_customers.c.account_id == account_id) & (
        payment_customers.c.provider == provider.name
    )
    conn = await work.connection()
    found = await conn.scalar(select(payment_customers.c.customer_id).where(where))
    if found is not None:
        return str(found)
    async with work.provider_call():
        customer_id = await provider.create_customer(account_id, f"customer-{account_id}")
    conn = await work.connection()
    # Safe when two requests race: the primary key (account, provider) lets one row in and
    # both read it. (A customer the loser's call made, without Stripe's idempotency, keeps
    # no card and is never charged.)
    await conn.execute(
        insert_or_ignore(payment_customers).values(
            account_id=account_id,
            provider=provider.name,
            customer_id=customer_id,
            created_at=utcnow(),
        )
    )
    return str(await conn.scalar(select(payment_customers.c.customer_id).where(where)))


async def keep_saved_card(
    conn: AsyncConnection, provider: str, purchase: Row[Any], payment: PaymentResult
) -> None:
    """A purchase whose payer asked, when confirming, to keep the card was just credited: its
    card becomes the account's auto top-up card, switched on (called once, by the transaction
    that credited). The provider's record of that confirmation is the only consent: nothing
    set before it (by whoever held the checkout link) counts."""
    card = payment.saved_card
    if card is None:
        return
    now = utcnow()
    values = {
        "provider": provider,
        "customer_id": card.customer_id,
        "payment_method_id": card.payment_method_id,
        "card_brand": (card.brand or "")[:32] or None,
        "card_last4": (card.last4 or "")[:4] or None,
        "enabled": True,
        "enabled_at": now,
        "consecutive_failures": 0,
        "disabled_reason": None,
        "updated_at": now,
    }
    # Safe: the caller's transaction holds the account's row lock (it credited the purchase),
    # so one account's settings are written by one transaction at a time.
    await conn.execute(
        pg_insert(auto_topup_settings)
        .values(account_id=purchase.account_id, created_at=now, **values)
        .on_conflict_do_update(index_elements=["account_id"], set_=values)
    )
    log.info(
        "auto_topup_card_saved",
        account_id=purchase.account_id,
        purchase_id=purchase.id,
        card_brand=values["card_brand"],
    )


async def settings_of(conn: AsyncConnection, account_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            select(auto_topup_settings).where(auto_topup_settings.c.account_id == account_id)
        )
    ).first()


async def set_enabled(conn: AsyncConnection, account_id: str, enabled: bool) -> Row[Any] | None:
    """Switch auto top-up on (needs a saved card: AutoTopupNeedsCard) or off. Switching on what
    is on changes nothing: its start (`enabled_at`) stays, so a balance.low crossing the job has
    not acted on yet is still acted on (issue 21 finding 3)."""
    now = utcnow()
    values: dict[str, Any] = {"enabled": enabled, "updated_at": now}
    if enabled:
        values.update(enabled_at=now, consecutive_failures=0, disabled_reason=None)
    else:
        values.update(disabled_reason="switched_off")
    changed = (
        await conn.execute(
            auto_topup_settings.update()
            .where(
                auto_topup_settings.c.account_id == account_id,
                # Safe by the CHECK too: never on without a card to charge.
                auto_topup_settings.c.payment_method_id.is_not(None) if enabled else true(),
                # Safe under concurrency: the row lock makes a second "on" re-check, see the
                # first one's `enabled` and change nothing.
                auto_topup_settings.c.enabled.is_(False) if enabled else true(),
            )
            .values(values)
            .returning(*auto_topup_settings.c)
        )
    ).first()
    if changed is None and enabled:
        found = await settings_of(conn, account_id)
        if found is not None and found.enabled and found.payment_method_id is not None:
            return found
        raise AutoTopupNeedsCard(
            "No saved card: pay once on the payment page with the auto top-up box ticked"
        )
    return changed


async def remove_card(work: UnitOfWork, provider: PaymentProvider, account_id: str) -> None:
    """Remove the saved card: auto top-up is switched off first (committed), then the provider
    forgets the card, then we do. A failed provider call leaves it off with the card still
    listed, so removing again finishes the job."""
    conn = await work.connection()
    found = await settings_of(conn, account_id)
    if found is None or found.payment_method_id is None:
        return
    await conn.execute(
        auto_topup_settings.update()
        .where(auto_topup_settings.c.account_id == account_id)
        .values(enabled=False, disabled_reason="card_removed", updated_at=utcnow())
    )
    async with work.provider_call():
        await provider.detach_card(found.payment_method_id)
    conn = await work.connection()
    await conn.execute(
        auto_topup_settings.update()
        .where(
            auto_topup_settings.c.account_id == account_id,
            auto_topup_settings.c.payment_method_id == found.payment_method_id,
        )
        .values(
            enabled=False,
            payment_method_id=None,
            card_brand=None,
            card_last4=None,
            disabled_reason="card_removed",
            updated_at=utcnow(),
        )
    )
    log.info("auto_topup_card_removed", account_id=account_id)


async def forget_on_erasure(conn: AsyncConnection, account_id: str) -> None:
    """An erased account is never charged again: auto top-up off and the card's brand and
    last 4 forgotten (in the erasure's transaction, after the account's row: the lock order).
    The card's provider id stays until the provider has detached it (detach_erased_cards)."""
    await conn.execute(
        auto_topup_settings.update()
        .where(auto_topup_settings.c.account_id == account_id)
        .values(
            enabled=False,
            card_brand=None,
            card_last4=None,
            disabled_reason=ERASED,
            updated_at=utcnow(),
        )
    )


ERASED = "account_erased"


async def detach_erased_cards(
    engine: AsyncEngine, provider: PaymentProvider, account_id: str | None = None, limit: int = 100
) -> tuple[int, int]:
    """Detach at the provider the cards of erased accounts (all, or `account_id`'s), then
    forget their ids: (detached, failed). Run after an erasure commits, and by the recovery
    job, so a provider that was down when the account was erased detaches it later."""
    query = select(auto_topup_settings.c.account_id, auto_topup_settings.c.payment_method_id).where(
        auto_topup_settings.c.disabled_reason == ERASED,
        auto_topup_settings.c.payment_method_id.is_not(None),
        auto_topup_settings.c.provider == provider.name,
    )
    if account_id is not None:
        query = query.where(auto_topup_settings.c.account_id == account_id)
    async with engine.connect() as conn:
        due = list(await conn.execute(query.limit(limit)))
    detached = failed = 0
    for row in due:
        try:
            # No transaction open while the provider answers; detaching twice is no error.
            await provider.detach_card(row.payment_method_id)
        except Exception as exc:  # unreachable, refused, its own store down: next run
            failed += 1
            log.warning(
                "erased_card_detach_failed", account_id=row.account_id, error=type(exc).__name__
            )
            continue
        async with engine.begin() as conn:
            # Safe beside another run: only the id just detached is cleared.
            await conn.execute(
                auto_topup_settings.update()
                .where(
                    auto_topup_settings.c.account_id == row.account_id,
                    auto_topup_settings.c.payment_method_id == row.payment_method_id,
                )
                .values(payment_method_id=None, updated_at=utcnow())
            )
        detached += 1
        log.info("erased_card_detached", account_id=row.account_id)
    return detached, failed
