"""Background jobs: nothing a customer paid for waits on an operator.

Five kinds of work (the retries and reconciliation used to need `ciris-billing webhooks
replay` and `reconcile` by hand):

- release every reservation held past its expires_at (accounts/reservations.py), so a client
  that died mid-interaction gets its uses back within a poll interval (capture after
  expires_at is refused by the clock, whatever this job's delay);
- retry every stored webhook event that is not handled (its handling failed, or the worker
  died mid-way), with exponential backoff per event (attempts, last error and the next try
  are kept on the event: webhooks/inbox.py);
- write off the lots past their expires_at (an `expired` movement and `credits.expired`) and
  send `credits.expiring` once per lot CREDITS_EXPIRING_NOTICE_DAYS before
  (accounts/lot_expiry.py); an expired lot was unusable from its instant already;
- ask the provider about every purchase still not final RECONCILE_AFTER_SECONDS after it
  started (a webhook that never came, or never got stored), and apply what it says, with the
  very code `ciris-billing reconcile` runs (payments.service.reconcile_purchase). A purchase
  is asked again after a delay that grows with its age (a quarter of it), for seven days;
- deliver the events outbox to the webhook endpoints (events/delivery.py): each tick fans new
  events out to the endpoints and defers one job per endpoint with deliveries due, with a lock
  per endpoint (one run at a time per endpoint; endpoints in parallel).

Three queues, each run by its own procrastinate worker in the process with its own job slots,
so no delivery can take a money job's slot (14 endpoints that hung held every slot once: holds
stayed held for minutes, reconciliation and auto top-up waited; tests/events/
test_issue22_item2_slow_endpoints.py): `jobs` (the four periodic tasks, one slot each),
`deliveries` (endpoints whose last attempt did not fail; WEBHOOK_DELIVERY_CONCURRENCY slots) and
`deliveries_failing` (endpoints failing: as many slots, so those wait only on each other).
An endpoint that starts hanging holds a `deliveries` slot for one WEBHOOK_TIMEOUT_SECONDS (a
run stops at its first failure), then is served in the failing lane.

The queue is procrastinate's (tables in our database, migration 0007). Every `serve` worker
process runs a procrastinate worker (JOBS_ENABLED), as does `ciris-billing worker`; the work
still runs once across all of them and all instances:

- the periodic task is deferred at most once per tick: procrastinate records each (task,
  tick) under a unique key in `procrastinate_periodic_defers`, so of all the deferrers only
  one inserts the job;
- its queueing lock keeps at most one waiting in the queue, and its lock lets only one run at a
  time (a job of a lock is not fetched while another of that lock is `doing`);
- a run whose worker was killed would hold that lock forever: `billing.clear_stalled` marks the
  jobs of workers whose heartbeat stopped as failed (the next tick runs anew);
- so would a run whose end could not be recorded (its connection cut while procrastinate wrote
  it; procrastinate lets that error end the job's task unseen, under a worker still beating):
  `RecordingJobManager` records a job's end again, on a new connection, until it is recorded
  (tests/webhooks/test_jobs_persist.py).

Running twice would still be safe, only wasteful: handling an event locks its row and finds it
handled, and a purchase is credited under a unique key (credits.external_transaction_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg
from procrastinate import App, JobContext, PsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException
from procrastinate.jobs import Status
from procrastinate.manager import JobManager
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.autotopup import topups
from ciris_billing.config import Settings
from ciris_billing.events.delivery import Deliveries
from ciris_billing.job_recovery import BATCH as BATCH
from ciris_billing.job_recovery import RECONCILE_MAX_AGE as RECONCILE_MAX_AGE
from ciris_billing.job_recovery import Recovery as Recovery
from ciris_billing.job_recovery import RecoveryReport as RecoveryReport
from ciris_billing.job_recovery import _name
from ciris_billing.observability import (
    JOBS_ITEMS,
    JOBS_RUNS,
    log,
)
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.pricing import Pricing

RECOVER = "billing.recover"
CLEAR_STALLED = "billing.clear_stalled"
AUTO_TOPUP = "billing.auto_topup"
WEBHOOKS = "billing.webhooks"
DELIVER = "billing.webhooks.deliver"
# The queues (each has its own worker, so its own slots: JobWorker).
JOBS_QUEUE = "jobs"
DELIVERIES_QUEUE = "deliveries"
FAILING_QUEUE = "deliveries_failing"
PERIODIC_TASKS = 4  # recover, auto_topup, clear_stalled, webhooks: one slot each


def conninfo(settings: Settings) -> str:
    """psycopg's form of DATABASE_URL (the queue's connections; ours use asyncpg)."""
    _scheme, _, rest = settings.async_database_url.partition("://")
    return f"postgresql://{rest}"


# How long a job's end is recorded again after its connection failed.
RECORD_END_SECONDS = 60.0


class RecordingJobManager(JobManager):
    """procrastinate's job manager, but a job's end (its final status) that failed on a lost
    connection is written again on a new one, with backoff, for up to RECORD_END_SECONDS."""

    async def finish_job_by_id_async(self, job_id: int, status: Status, delete_job: bool) -> None:
        deadline, delay, attempt = time.monotonic() + RECORD_END_SECONDS, 0.2, 1
        while True:
            try:
                await super().finish_job_by_id_async(job_id, status, delete_job)
                return
            except ConnectorException as exc:
                lost = isinstance(exc.__cause__, psycopg.OperationalError)
                if attempt > 1 and isinstance(exc.__cause__, psycopg.errors.RaiseException):
                    # Safe: an earlier attempt was written after all (its answer was lost): the
                    # job is no longer 'doing', which is all this was for.
                    return
                if not lost or time.monotonic() + delay > deadline:
                    raise
            log.warning("job_end_not_recorded", job_id=job_id, attempt=attempt)
            await asyncio.sleep(delay)
            delay, attempt = min(delay * 2, 5.0), attempt + 1


def job_queue(settings: Settings) -> App:
    """The procrastinate app with our two periodic tasks (not opened)."""
    connector = PsycopgConnector(
        conninfo=conninfo(settings),
        min_size=1,
        # Two workers listen (a connection each), and all three fetch and record jobs.
        max_size=5,
        # (procrastinate has the pool check each connection before handing it out: one killed
        # while idle is replaced.)
    )
    queue = App(connector=connector)
    queue.job_manager = RecordingJobManager(connector=connector)
    every = f"* * * * * */{settings.jobs_poll_seconds}"  # croniter: the 6th field is seconds

    @queue.periodic(cron=every, periodic_id="recover")
    @queue.task(
        name=RECOVER, queue=JOBS_QUEUE, queueing_lock=RECOVER, lock=RECOVER, pass_context=True
    )
    async def recover(context: JobContext, timestamp: int) -> None:
        recovery: Recovery = context.additional_context["recovery"]
        try:
            report = await recovery.run_once()
        except Exception:
            JOBS_RUNS.labels(RECOVER, "failed").inc()
            raise
        JOBS_RUNS.labels(RECOVER, "ok").inc()
        if report.events or report.purchases or report.expired or report.lots_expired:
            log.info(
                "job_recover_done",
                events=report.events,
                purchases=report.purchases,
                expired_holds=report.expired,
                expired_lots=report.lots_expired,
                failures=report.failures,
            )

    @queue.periodic(cron=every, periodic_id="auto_topup")
    @queue.task(
        name=AUTO_TOPUP,
        queue=JOBS_QUEUE,
        queueing_lock=AUTO_TOPUP,
        lock=AUTO_TOPUP,
        pass_context=True,
    )
    async def auto_topup(context: JobContext, timestamp: int) -> None:
        # Its own task and lock: a slow provider call never delays the recovery work, and one
        # run at a time across workers decides and pays (autotopup/topups.py).
        recovery: Recovery = context.additional_context["recovery"]
        try:
            report = await topups.run_once(
                recovery.engine,
                recovery.provider,
                Pricing.from_settings(recovery.settings),
                recovery.settings,
            )
        except Exception:
            JOBS_RUNS.labels(AUTO_TOPUP, "failed").inc()
            raise
        JOBS_RUNS.labels(AUTO_TOPUP, "ok").inc()
        if report.started or report.outcomes or report.skipped:
            log.info(
                "job_auto_topup_done",
                started=report.started,
                skipped=report.skipped,
                outcomes=report.outcomes,
            )

    @queue.periodic(cron=every, periodic_id="clear_stalled")
    @queue.task(
        name=CLEAR_STALLED, queue=JOBS_QUEUE, queueing_lock=CLEAR_STALLED, pass_context=True
    )
    async def clear_stalled(context: JobContext, timestamp: int) -> None:
        stalled_after: float = context.additional_context["stalled_after"]
        manager = context.app.job_manager
        for job in await manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after):
            if job.id == (context.job.id if context.job else None):
                continue
            # Its worker is gone: end it, so its lock frees and the next tick runs anew.
            await manager.finish_job(job, status=Status.FAILED, delete_job=False)
            log.warning("job_stalled_cleared", task=job.task_name, job_id=job.id)
        JOBS_RUNS.labels(CLEAR_STALLED, "ok").inc()

    @queue.task(name=DELIVER, queue=DELIVERIES_QUEUE, pass_context=True)
    async def deliver(context: JobContext, endpoint_id: str) -> None:
        deliveries: Deliveries = context.additional_context["deliveries"]
        try:
            run = await deliveries.deliver_endpoint(endpoint_id)
        except Exception:
            JOBS_RUNS.labels(DELIVER, "failed").inc()
            raise
        JOBS_RUNS.labels(DELIVER, "ok").inc()
        JOBS_ITEMS.labels("webhook_delivery", "delivered").inc(run.delivered)
        JOBS_ITEMS.labels("webhook_delivery", "failed").inc(run.failed)

    @queue.periodic(cron=every, periodic_id="webhooks")
    @queue.task(
        name=WEBHOOKS, queue=JOBS_QUEUE, queueing_lock=WEBHOOKS, lock=WEBHOOKS, pass_context=True
    )
    async def webhooks(context: JobContext, timestamp: int) -> None:
        deliveries: Deliveries = context.additional_context["deliveries"]
        try:
            await deliveries.dispatch()
            for endpoint_id, failing in await deliveries.due_endpoints_failing():
                # One job per endpoint: its lock runs an endpoint's deliveries one run at a
                # time, its queueing lock keeps one waiting at most (a tick while one waits
                # defers nothing), in either lane.
                lock = f"{DELIVER}:{endpoint_id}"
                lane = FAILING_QUEUE if failing else DELIVERIES_QUEUE
                with contextlib.suppress(AlreadyEnqueued):
                    await deliver.configure(lock=lock, queueing_lock=lock, queue=lane).defer_async(
                        endpoint_id=endpoint_id
                    )
            await deliveries.measure()
        except Exception:
            JOBS_RUNS.labels(WEBHOOKS, "failed").inc()
            raise
        JOBS_RUNS.labels(WEBHOOKS, "ok").inc()

    return queue


SHUTDOWN_SECONDS = 8.0
STARTUP_DELAY_SECONDS = 1.0


class JobWorker:
    """A procrastinate worker that runs until cancelled, started again after any failure (a
    killed database connection stops procrastinate's worker)."""

    def __init__(self, settings: Settings, engine: AsyncEngine, provider: PaymentProvider) -> None:
        self.settings = settings
        self.recovery = Recovery(settings, engine, provider)
        self.deliveries = Deliveries(engine, settings)
        heartbeat = max(1.0, min(10.0, settings.jobs_poll_seconds / 2))
        self.heartbeat_seconds = heartbeat
        self.stalled_after = 3 * heartbeat + 1
        # procrastinate logs every job start and end at INFO: a line per second at our pace.
        logging.getLogger("procrastinate").setLevel(logging.WARNING)

    def _worker(self, queue: App, name: str, slots: int, *, listen: bool) -> Any:
        return queue.run_worker_async(
            queues=[name],
            name=name,
            concurrency=slots,
            wait=True,
            install_signal_handlers=False,
            delete_jobs="successful",
            listen_notify=listen,
            fetch_job_polling_interval=self.settings.jobs_poll_seconds,
            update_heartbeat_interval=self.heartbeat_seconds,
            stalled_worker_timeout=self.stalled_after,
            shutdown_graceful_timeout=5,
            additional_context={
                "recovery": self.recovery,
                "deliveries": self.deliveries,
                "stalled_after": self.stalled_after,
            },
        )

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self.deliveries.aclose()

    async def _run(self) -> None:
        # Let the server finish starting first: a worker cancelled while procrastinate opens its
        # pool left tasks behind that kept the process from exiting (seen when the bind failed
        # right after start-up); cancelled during this sleep, it simply ends.
        await asyncio.sleep(STARTUP_DELAY_SECONDS)
        delay = 1.0
        while True:
            queue = job_queue(self.settings)
            try:
                async with queue.open_async():
                    deliveries = self.settings.webhook_delivery_concurrency
                    # Three workers, so three sets of slots; the first one to end (a killed
                    # connection stops it) ends the others, and all start again.
                    workers = [
                        self._worker(queue, JOBS_QUEUE, PERIODIC_TASKS, listen=True),
                        self._worker(queue, DELIVERIES_QUEUE, deliveries, listen=True),
                        # (It polls: one connection fewer; its jobs are retries anyway.)
                        self._worker(queue, FAILING_QUEUE, deliveries, listen=False),
                    ]
                    tasks = [asyncio.create_task(worker) for worker in workers]
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                    for task in done:
                        task.result()  # its failure, if it failed
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                JOBS_RUNS.labels("worker", "restarted").inc()
                log.warning("jobs_worker_restarting", error=_name(exc), in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


@contextlib.asynccontextmanager
async def running_jobs(settings: Settings, engine: AsyncEngine, provider: PaymentProvider) -> Any:
    """Run the job worker in the background for the block's duration (the app's lifespan)."""
    task = asyncio.create_task(JobWorker(settings, engine, provider).run(), name="billing-jobs")
    try:
        yield task
    finally:
        task.cancel()
        # Bounded: shutdown never waits on the queue for long (a job in flight is retried by
        # the next run: every step it takes is idempotent).
        done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_SECONDS)
        if not done:
            log.warning("jobs_worker_not_stopped", within_seconds=SHUTDOWN_SECONDS)
        elif not task.cancelled() and (failure := task.exception()) is not None:
            log.warning("jobs_worker_failed", error=_name(failure))
