"""The periodic recovery run (jobs.py's `billing.recover`): expire holds and lots, detach erased
accounts' cards, redeliver the sandbox's webhooks, retry stored webhook events, reconcile
purchases not yet final and roll up the reports' closed days; each step on its own, so one
failing does not stop the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts import lot_expiry, reservations
from ciris_billing.autotopup import cards
from ciris_billing.config import Settings
from ciris_billing.db import purchases, utcnow, webhook_events
from ciris_billing.observability import (
    JOBS_FAILURES,
    JOBS_ITEMS,
    JOBS_QUEUE_DEPTH,
    RESERVATIONS,
    log,
)
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.reports import rollups
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox

# Purchases older than this are left to `ciris-billing reconcile` (abandoned checkouts).
RECONCILE_MAX_AGE = timedelta(days=7)
# Per run, at most this many events and purchases (the next tick takes the rest).
BATCH = 200


@dataclass
class RecoveryReport:
    events: dict[str, int] = field(default_factory=dict)
    purchases: dict[str, int] = field(default_factory=dict)
    expired: int = 0
    lots_expired: int = 0
    failures: int = 0

    def count(self, kind: dict[str, int], outcome: str) -> None:
        kind[outcome] = kind.get(outcome, 0) + 1


class Recovery:
    """One run of the recovery work (the periodic job's body; tests call it directly)."""

    def __init__(self, settings: Settings, engine: AsyncEngine, provider: PaymentProvider) -> None:
        self.settings = settings
        self.engine = engine
        self.provider = provider

    async def run_once(self) -> RecoveryReport:
        report = RecoveryReport()
        await self.expire_holds(report)
        await self._expire_lots(report)
        await self._redeliver_provider_webhooks()
        await self._retry_events(report)
        await self._reconcile_purchases(report)
        await self._detach_erased_cards(report)
        await self._roll_reports(report)
        await self._measure()
        return report

    async def _detach_erased_cards(self, report: RecoveryReport) -> None:
        """Cards of erased accounts still attached at the provider (it was down when the
        account was erased): detached now, or again next run."""
        try:
            _detached, failed = await cards.detach_erased_cards(self.engine, self.provider)
        except Exception as exc:  # the database: next run
            failed = 1
            log.warning("job_detach_erased_cards_failed", error=_name(exc))
        report.failures += failed
        if failed:
            JOBS_FAILURES.labels("detach_erased_cards").inc()

    async def expire_holds(self, report: RecoveryReport) -> None:
        """Release the holds past their expires_at, one account per unit of work (one account
        row locked per transaction: no lock-order question with charges' batches)."""
        now = utcnow()
        async with self.engine.connect() as conn:
            due = await reservations.accounts_with_expired_holds(conn, now, BATCH)
        for account_id in due:
            try:
                async with unit_of_work(self.engine) as work:
                    conn = await work.connection()
                    # Safe run twice or beside a capture: the UPDATE only takes holds still
                    # 'held' (reservations.expire_account).
                    expired = await reservations.expire_account(conn, account_id, now)
            except Exception as exc:  # nothing committed for it: due again next run
                report.failures += 1
                JOBS_FAILURES.labels("expire_holds").inc()
                log.warning("job_expire_holds_failed", account_id=account_id, error=_name(exc))
                continue
            for held in expired:
                report.expired += 1
                RESERVATIONS.labels("expired").inc()
                JOBS_ITEMS.labels("expire_holds", "expired").inc()
                log.info(
                    "reservation_expired",
                    reservation_id=held.id,
                    account_id=account_id,
                    uses=int(held.uses),
                )

    async def _expire_lots(self, report: RecoveryReport) -> None:
        """Lots past their expiry written off, credits.expiring sent (accounts/lot_expiry.py)."""
        notice_days = self.settings.credits_expiring_notice_days
        try:
            done = await lot_expiry.run_once(self.engine, utcnow(), notice_days)
        except Exception as exc:  # the database: next run
            done = lot_expiry.LotsReport(failures=1)
            log.warning("job_expire_lots_failed", error=_name(exc))
        report.failures += done.failures
        report.lots_expired += done.expired
        if done.failures:
            JOBS_FAILURES.labels("expire_lots").inc(done.failures)
        JOBS_ITEMS.labels("expire_lots", "expired").inc(done.expired)
        JOBS_ITEMS.labels("expire_lots", "notified").inc(done.notified)

    async def _roll_reports(self, report: RecoveryReport) -> None:
        """The reports' closed days rolled up (reports/rollups.py), so a report reads them."""
        try:
            async with unit_of_work(self.engine) as work:
                days = await rollups.roll(await work.connection(), utcnow())
        except Exception as exc:  # the database: next run (a report rolls what is due too)
            report.failures += 1
            JOBS_FAILURES.labels("roll_reports").inc()
            log.warning("job_roll_reports_failed", error=_name(exc))
            return
        JOBS_ITEMS.labels("roll_reports", "days").inc(days)

    async def _redeliver_provider_webhooks(self) -> None:
        """The sandbox's side of Stripe's redelivery (sandbox_webhooks.py); Stripe does its own."""
        redeliver = getattr(self.provider, "redeliver_webhooks", None)
        if redeliver is None:
            return
        try:
            delivered = await redeliver()
        except Exception as exc:  # its events stay due: the next run sends them
            JOBS_FAILURES.labels("provider_redelivery").inc()
            log.warning("job_provider_redelivery_failed", error=_name(exc))
            return
        if delivered:
            JOBS_ITEMS.labels("provider_redelivery", "delivered").inc(delivered)

    async def _retry_events(self, report: RecoveryReport) -> None:
        now = utcnow()
        poll = self.settings.jobs_poll_seconds
        # An event received in the last seconds is most likely being handled by its delivery.
        due = await inbox.due_event_ids(
            self.engine, self.provider.name, now, now - timedelta(seconds=poll), BATCH
        )
        for event_id in due:
            try:
                async with unit_of_work(self.engine) as work:
                    handled = await inbox.handle(
                        work, self.provider, event_id, retry_base_seconds=poll
                    )
            except Exception as exc:  # recorded on the event by handle(); retried later
                report.failures += 1
                report.count(report.events, "failed")
                JOBS_FAILURES.labels("webhook_retry").inc()
                log.warning("job_webhook_retry_failed", event_id=event_id, error=_name(exc))
                continue
            report.count(report.events, handled.outcome)
            JOBS_ITEMS.labels("webhook_retry", handled.outcome).inc()

    async def _reconcile_purchases(self, report: RecoveryReport) -> None:
        now = utcnow()
        async with self.engine.connect() as conn:
            due = list(await conn.execute(self._due_purchases(now)))
        for purchase in due:
            try:
                async with unit_of_work(self.engine) as work:
                    outcome = await payments.reconcile_purchase(
                        work, self.provider, purchase.payment_id
                    )
                    conn = await work.connection()
                    await conn.execute(
                        purchases.update()
                        .where(purchases.c.id == purchase.id)
                        .values(reconciled_at=utcnow())
                    )
            except Exception as exc:  # nothing committed for it: due again next run
                report.failures += 1
                report.count(report.purchases, "failed")
                JOBS_FAILURES.labels("reconcile").inc()
                log.warning(
                    "job_reconcile_failed", payment_id=purchase.payment_id, error=_name(exc)
                )
                continue
            report.count(report.purchases, outcome)
            JOBS_ITEMS.labels("reconcile", outcome).inc()
            if outcome in ("credited", "credited_and_refunded"):
                log.info("job_reconcile_credited", payment_id=purchase.payment_id)

    def _due_purchases(self, now: datetime) -> Any:
        after = timedelta(seconds=self.settings.reconcile_after_seconds)
        seen_paid = purchases.c.paid_seen_at.is_not(None)
        return (
            select(purchases.c.id, purchases.c.payment_id)
            .where(*self._open_purchase_clauses(now))
            .where(
                # Asked again after max(RECONCILE_AFTER_SECONDS, a quarter of its age); one
                # the payer was told had succeeded, every run until it is final.
                purchases.c.reconciled_at.is_(None)
                | (
                    seen_paid
                    & (
                        purchases.c.reconciled_at
                        <= now - timedelta(seconds=self.settings.jobs_poll_seconds)
                    )
                )
                | (
                    purchases.c.reconciled_at
                    <= text(
                        "CAST(:now AS timestamptz) - greatest(make_interval(secs => :after), "
                        "(CAST(:now AS timestamptz) - purchases.created_at) / 4)"
                    ).bindparams(now=now, after=after.total_seconds())
                )
            )
            .order_by(
                purchases.c.paid_seen_at.is_(None),
                purchases.c.reconciled_at.nulls_first(),
                purchases.c.created_at,
            )
            .limit(BATCH)
        )

    def _open_purchase_clauses(self, now: datetime) -> list[Any]:
        after = timedelta(seconds=self.settings.reconcile_after_seconds)
        return [
            purchases.c.provider == self.provider.name,
            purchases.c.status.not_in(payments.FINAL_STATUSES),
            # A purchase the payer's page (or client) saw succeed is asked about at once.
            (purchases.c.created_at <= now - after) | purchases.c.paid_seen_at.is_not(None),
            purchases.c.created_at >= now - RECONCILE_MAX_AGE,
        ]

    async def _measure(self) -> None:
        now = utcnow()
        async with self.engine.connect() as conn:
            events = await conn.scalar(
                select(func.count())
                .select_from(webhook_events)
                .where(webhook_events.c.handled_at.is_(None))
            )
            open_purchases = await conn.scalar(
                select(func.count()).select_from(purchases).where(*self._open_purchase_clauses(now))
            )
            queued = await conn.scalar(
                text("SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")
            )
        JOBS_QUEUE_DEPTH.labels("webhook_events").set(int(events or 0))
        JOBS_QUEUE_DEPTH.labels("purchases").set(int(open_purchases or 0))
        JOBS_QUEUE_DEPTH.labels("jobs").set(int(queued or 0))


def _name(exc: BaseException) -> str:
    """An error for logs: its code or class, never its message (SQL parameters, payloads)."""
    return str(getattr(exc, "code", None) or type(exc).__name__)
