"""The job runner: async chat tasks and batches, inside `glmstack serve`, driven by their own rows.

Why a lease loop over the API's rows rather than a queue library (huey 3.5 was measured for this): the state
a client sees (a task's status, a batch's counts and files) has to live in our tables anyway, so a queue would
be a second copy of it - a message enqueued after the row commits is lost by a crash between the two, one
enqueued before can run for a row that never committed - and huey's PostgreSQL storage goes through peewee and
psycopg2, a second ORM and driver beside SQLAlchemy and psycopg 3. Here the rows are the queue: a runner
claims one with a lease (store/leases.py), renews it while it works, writes each result in the transaction
that marks it done, and a row whose runner died (lease run out, or its process gone) is claimed again. The
documents table is the indexer's queue the same way (knowledge/indexer.py).

All engine work of the jobs shares `settings.batch_concurrency` slots and is background work for the engine
scheduler (interactive requests are admitted and prefilled first).

Shutdown (api/shutdown.py): once draining, nothing new is claimed or started; work in flight may finish until
the deadline, then it is aborted and its leases released, so the next server resumes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from glmstack.api.deps import Platform
from glmstack.jobs import requests
from glmstack.jobs.batch_run import BatchRun
from glmstack.jobs.fine_tune_run import FineTuneRun, adapter_dir_of, serve_adapter
from glmstack.store.async_tasks import AsyncTask
from glmstack.store.errors import StoreUnavailableError
from glmstack.store.leases import owner_tag

log = logging.getLogger(__name__)

LEASE_S = 30.0
# How often a running job renews its lease and, for a batch, looks for a cancel made through another server
# and for the end of its window: one small write a second per job.
HEARTBEAT_S = 1.0
POLL_S = 2.0  # how often the database is looked at for work another server created
MAX_BATCHES = 4  # batches this server runs at once (their lines share the slots)
SWEEP_EVERY_S = 600.0


class JobRunner:
    def __init__(self, platform: Platform, *, lease_s: float = LEASE_S, poll_s: float = POLL_S) -> None:
        self.platform = platform
        self.me = owner_tag()
        self.lease_s, self.poll_s = lease_s, poll_s
        settings = platform.settings
        # batch_concurrency run in the engine at once (`glmstack serve` caps its background rows at that), and
        # batch_prefetch more wait there to take a finished line's place within a step
        self.slots = asyncio.Semaphore(settings.batch_concurrency + settings.batch_prefetch)
        self.batches: dict[str, BatchRun] = {}
        self.fine_tunes: dict[str, FineTuneRun] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}  # async chat tasks in flight, by id
        self._jobs: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._last_sweep = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """From the app's lifespan (in the server's event loop)."""
        self._loop_task = asyncio.create_task(self._loop(), name="glmstack-jobs")
        self._spawn(self._serve_fine_tuned(), None, "serve-fine-tuned")
        self._shutdown_task = asyncio.create_task(self._watch_shutdown(), name="glmstack-jobs-drain")

    async def stop(self) -> None:
        """Stops everything now; leases are released so another server (or the next start) resumes at once."""
        for task in (self._loop_task, self._shutdown_task):
            if task is not None:
                task.cancel()
        self._abort_all()
        if self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)

    def wake(self) -> None:
        """New work was created: look now rather than at the next poll."""
        self._wake.set()

    def cancel_fine_tune(self, job_id: str) -> None:
        run = self.fine_tunes.get(job_id)
        if run is not None:
            run.stop(cancel=True)

    def cancel_batch(self, batch_id: str) -> None:
        """A cancel came in through this server: stop its lines now (another server holding the batch sees
        the cancel at its next lease renewal)."""
        run = self.batches.get(batch_id)
        if run is not None:
            run.stop("cancelled")
        else:
            self.wake()  # not running here: claim it and wind it down

    # ---- the loop -----------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self.platform.drain.draining:
            try:
                await self._claim_work()
                if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
                    self._last_sweep = time.monotonic()
                    removed = await asyncio.to_thread(self.platform.store.async_tasks.delete_finished_before,
                                                      self.platform.settings.async_result_ttl_s)
                    if removed:
                        log.info("deleted %d async results older than %d s", removed,
                                 self.platform.settings.async_result_ttl_s)
            except StoreUnavailableError as e:
                log.warning("job runner: %s; trying again", e)
            except Exception:
                log.exception("job runner failed to claim work; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _claim_work(self) -> None:
        store = self.platform.store
        # async tasks: as many as there are free slots (each holds one while it runs)
        while len(self.tasks) < self.platform.settings.batch_concurrency and not self.platform.drain.draining:
            task = await asyncio.to_thread(store.async_tasks.claim, self.me, self.lease_s)
            if task is None:
                break
            self._spawn(self._run_task(task), self.tasks, task.id)
        while len(self.batches) < MAX_BATCHES and not self.platform.drain.draining:
            batch = await asyncio.to_thread(store.batches.claim, self.me, self.lease_s)
            if batch is None:
                break
            run = BatchRun(self.platform, batch, self.slots)
            self.batches[batch.id] = run
            self._spawn(self._run_batch(run), None, batch.id)
        while len(self.fine_tunes) < self.platform.settings.finetune_concurrency and not self.platform.drain.draining:
            job = await asyncio.to_thread(store.fine_tuning.claim, self.me, self.lease_s)
            if job is None:
                break
            fine_tune = FineTuneRun(self.platform, job)
            self.fine_tunes[job.id] = fine_tune
            self._spawn(self._run_fine_tune(fine_tune), None, job.id)

    def _spawn(self, coroutine: Any, registry: dict[str, asyncio.Task[None]] | None, key: str) -> None:
        job = asyncio.create_task(coroutine)
        self._jobs.add(job)
        if registry is not None:
            registry[key] = job

        def forget(done: asyncio.Task[None]) -> None:
            self._jobs.discard(done)
            if registry is not None:
                registry.pop(key, None)

        job.add_done_callback(forget)

    # ---- a batch ------------------------------------------------------------------------------------------

    async def _run_batch(self, run: BatchRun) -> None:
        def renewed(status: str | None) -> bool:
            if status is None:
                run.stop(None)
                return False
            if status == "cancelling":
                run.stop("cancelled")
            elif run.batch.expires_at is not None and time.time() > run.batch.expires_at:
                run.stop("expired")
            return True

        await self._run_leased("batch", run.batch.id, run.run(), self.batches, self.platform.store.batches, renewed)

    # ---- a fine-tuning job -------------------------------------------------------------------------------

    async def _run_fine_tune(self, run: FineTuneRun) -> None:
        def renewed(cancel: bool | None) -> bool:
            if cancel is None:
                run.stop(cancel=False)
                return False
            if cancel:
                run.stop(cancel=True)
            return True

        await self._run_leased("fine-tuning job", run.job.id, run.run(), self.fine_tunes,
                               self.platform.store.fine_tuning, renewed)

    # ---- what batches and fine-tuning jobs share ------------------------------------------------------------

    async def _run_leased(self, what: str, row_id: str, work: Coroutine[Any, Any, None], registry: dict[str, Any],
                          store: Any, renewed: Callable[[Any], bool]) -> None:
        """Runs `work` while renewing the lease on its row every HEARTBEAT_S; `renewed` gets what the store's
        renew answered (None: the lease is lost to another server) and returns whether to keep renewing.
        A store outage or an error leaves the row to the next claim, here or on another server."""
        heartbeat = asyncio.create_task(self._heartbeat(what, row_id, store, renewed))
        try:
            await work
        except StoreUnavailableError as e:
            log.warning("%s %s paused: %s", what, row_id, e)
        except Exception:
            log.exception("%s %s stopped by an error; it resumes at the next claim", what, row_id)
        finally:
            heartbeat.cancel()
            registry.pop(row_id, None)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.release, row_id, self.me)
            self.wake()  # a place is free: another job may be waiting

    async def _heartbeat(self, what: str, row_id: str, store: Any, renewed: Callable[[Any], bool]) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                answer = await asyncio.to_thread(store.renew, row_id, self.me, self.lease_s)
            except StoreUnavailableError:
                continue  # the lease holds a while longer; try again
            if answer is None:
                log.warning("%s %s: lease lost to another server; stopping here", what, row_id)
            if not renewed(answer):
                return

    async def _serve_fine_tuned(self) -> None:
        """At start-up: every fine-tuned model that succeeded (and was not deleted) is served again."""
        try:
            jobs = await asyncio.to_thread(self.platform.store.fine_tuning.served_models)
        except StoreUnavailableError as e:
            log.warning("fine-tuned models not loaded: %s", e)
            return
        for job in jobs:
            try:
                await serve_adapter(self.platform, job.fine_tuned_model, str(adapter_dir_of(self.platform, job)))
            except Exception as e:
                log.warning("fine-tuned model %s could not be served: %s", job.fine_tuned_model, e)

    # ---- an async chat task -------------------------------------------------------------------------------

    async def _run_task(self, task: AsyncTask) -> None:
        store = self.platform.store.async_tasks
        heartbeat = asyncio.create_task(self._task_heartbeat(task.id))
        finished = False
        try:
            async with self.slots:
                status, body = await requests.run_chat(self.platform, requests.caller_for(task.key_id), task.body,
                                                       request_id=task.request_id)
            if status == 200:
                result: dict[str, Any] = {key: body[key] for key in ("choices", "usage", "created", "model")
                                          if key in body}
                if "retrieval" in body:
                    result["retrieval"] = body["retrieval"]
                finished = await asyncio.to_thread(store.finish, task.id, self.me, "SUCCESS", result)
            else:
                finished = await asyncio.to_thread(store.finish, task.id, self.me, "FAIL",
                                                   {"error": body.get("error", body)})
        except asyncio.CancelledError:
            pass  # shutdown: released below, run again by the next server
        except StoreUnavailableError as e:
            log.warning("async task %s paused: %s", task.id, e)
        except Exception:
            log.exception("async task %s failed; it runs again at the next claim", task.id)
        finally:
            heartbeat.cancel()
            if not finished:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(store.release, task.id, self.me)

    async def _task_heartbeat(self, task_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(StoreUnavailableError):
                await asyncio.to_thread(self.platform.store.async_tasks.renew, task_id, self.me, self.lease_s)

    # ---- shutdown -----------------------------------------------------------------------------------------

    async def _watch_shutdown(self) -> None:
        drain = self.platform.drain
        await drain.wait_started()
        self._wake.set()  # the loop sees `draining` and ends
        for run in list(self.batches.values()):
            run.stop_taking_lines()
        for fine_tune in list(self.fine_tunes.values()):
            fine_tune.stop(cancel=False)  # the trainer checkpoints and exits; the next server resumes
        await drain.wait_deadline()
        self._abort_all()

    def _abort_all(self) -> None:
        for run in list(self.batches.values()):
            run.stop(None)
        for fine_tune in list(self.fine_tunes.values()):
            fine_tune.stop(cancel=False)
        for task in list(self.tasks.values()):
            task.cancel()
