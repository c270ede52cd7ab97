"""Micro-batching: requests wait in an asyncio queue; one task gathers compatible ones (same kind of
call, same generation settings) for at most ``max_wait_ms`` or until ``max_batch`` rows, and runs the
batch on the single model thread. Requests for different adapters end up in one mixed batch."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import PeftlabError


class ServingFailure(PeftlabError, RuntimeError):
    """A model call or adapter operation failed unexpectedly (HTTP 500); the server keeps serving."""


@dataclass
class Job:
    key: tuple  # ("predict",) or ("generate", max_new_tokens, temperature)
    rows: list
    future: asyncio.Future = field(default=None)


class MicroBatcher:
    def __init__(self, store, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.store, self.max_batch, self.max_wait = store, max(1, int(max_batch)), max(0.0, max_wait_ms) / 1000
        self.queue: asyncio.Queue | None = None
        self.pending: list[Job] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftlab-model")
        self.task: asyncio.Task | None = None
        self.batches = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def call(self, fn, *args):
        """Run ``fn`` on the model thread (adapter management shares it with the model calls); errors that
        are not peftlab's come back as :class:`ServingFailure` (HTTP 500)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except PeftlabError:
            raise
        except Exception as e:
            raise ServingFailure(f"{getattr(fn, '__name__', 'model call')} failed: {type(e).__name__}: {e}") from e

    async def submit(self, key: tuple, rows: list) -> list:
        job = Job(key, rows, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _next(self, timeout: float | None) -> Job | None:
        if self.pending:
            return self.pending.pop(0)
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        while True:
            first = await self._next(None)
            jobs, n, skipped = [first], len(first.rows), []
            adapters = {r.adapter for r in first.rows} - {None}
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                job = await self._next(deadline - time.monotonic())
                if job is None:
                    break
                more = adapters | ({r.adapter for r in job.rows} - {None})
                if job.key != first.key or n + len(job.rows) > self.max_batch or len(more) > self.store.max_loaded:
                    skipped.append(job)
                    if job.key == first.key:
                        break
                    continue
                jobs.append(job)
                n += len(job.rows)
                adapters = more
            self.pending = skipped + self.pending
            await self._run(jobs)

    async def _run(self, jobs: list[Job]) -> None:
        from .batch import NotBatchableError

        rows = [r for j in jobs for r in j.rows]
        key = jobs[0].key
        fn = self.store.predict if key[0] == "predict" else (lambda rs: self.store.generate(rs, *key[1:]))
        try:
            out = await self.call(fn, rows)
        except Exception as e:  # one bad batch must not stop the server: every request in it gets the error
            if isinstance(e, NotBatchableError) and len(jobs) > 1:  # e.g. prompt-tuning rows beside LoRA rows
                for j in jobs:
                    await self._run([j])
                return
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self.batches += 1
        i = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(out[i:i + len(j.rows)])
            i += len(j.rows)
