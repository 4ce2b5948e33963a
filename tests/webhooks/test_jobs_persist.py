"""A job whose end could not be recorded does not hold its lock forever.

Found by CI (tests/faults/test_automatic_recovery.py, every connection of the database killed
every 0.3 s): a recovery job ran, but recording its end (procrastinate's finish_job) failed on
a killed connection. procrastinate lets that error end the job's task unseen, so the job stayed
'doing' under a worker that was alive and beating (clear_stalled clears only jobs of dead
workers), and its lock kept every later recovery job from running: 20 paid purchases stayed
uncredited for the 120 s the test waited. Here the job's row is locked while its end is being
recorded, so the statement is in flight when a TCP proxy cuts the connection.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from ciris_billing import jobs
from tests.support.api import make_settings
from tests.support.faults import proxied_database

TASK = "test.ends_while_the_database_is_cut"


async def _status(conn: asyncpg.Connection) -> str | None:
    status: str | None = await conn.fetchval(
        "SELECT status::text FROM procrastinate_jobs WHERE task_name = $1", TASK
    )
    return status


async def test_a_job_whose_end_could_not_be_recorded_does_not_keep_its_lock(
    fresh_database: str,
) -> None:
    with proxied_database(fresh_database) as (proxy, via_proxy):
        queue = jobs.job_queue(make_settings(via_proxy))
        running, may_end = asyncio.Event(), asyncio.Event()

        @queue.task(name=TASK, lock=TASK)
        async def ends_while_the_database_is_cut() -> None:
            running.set()
            await may_end.wait()

        direct = await asyncpg.connect(fresh_database)
        try:
            async with queue.open_async():
                await ends_while_the_database_is_cut.defer_async()
                worker = asyncio.create_task(
                    queue.run_worker_async(
                        concurrency=1,
                        wait=True,
                        listen_notify=False,
                        fetch_job_polling_interval=0.2,
                        install_signal_handlers=False,
                        delete_jobs="never",
                    )
                )
                try:
                    await asyncio.wait_for(running.wait(), 20)
                    # Its end will wait for this lock, in flight, when the connection is cut.
                    async with direct.transaction():
                        await direct.execute(
                            "SELECT 1 FROM procrastinate_jobs WHERE task_name = $1 FOR UPDATE",
                            TASK,
                        )
                        may_end.set()
                        await asyncio.sleep(1.0)
                        proxy.down()
                    proxy.up()
                    async with asyncio.timeout(30):
                        while await _status(direct) == "doing":
                            await asyncio.sleep(0.2)
                finally:
                    worker.cancel()
                    with contextlib.suppress(BaseException):
                        await worker
            assert await _status(direct) == "succeeded"
        finally:
            await direct.close()
