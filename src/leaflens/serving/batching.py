"""Micro-batching: concurrent single-image requests are gathered into one engine call.

ONNX Runtime runs a batch of 16 images much faster than 16 batches of one, so under load the service waits a
few milliseconds for more requests before it calls the engine. Each caller awaits its own future and gets back
the result for its own item; a failing batch fails every caller in it with the same error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T]], Sequence[R]]


class BatcherClosedError(RuntimeError):
    """The batcher was stopped (server shutting down) before the item ran."""


class MicroBatcher(Generic[T, R]):
    """Gather items submitted concurrently into batches of at most ``max_batch_size`` for ``fn``.

    A batch runs as soon as it is full, or ``max_wait_ms`` after its first item arrived (``0``: at once, with
    whatever is already queued). Items that arrive while a batch runs are picked up by the next one without
    waiting, so batches grow with the load. At most ``concurrency`` batches run at once, each on a thread of
    the batcher's own pool (one per core when the engine runs single-threaded; 1 when it uses every core).
    With ``max_batch_size <= 1`` batching is off: every item calls ``fn([item])`` directly on the thread pool.

    Args:
        fn: Runs a list of items, returns one result per item, in order. Called from a worker thread.
        max_batch_size: Most items per call of ``fn``.
        max_wait_ms: Longest time the first item of a batch waits for others.
        concurrency: Most batches running at the same time.
        on_batch: Called with the size of each batch (for metrics).
    """

    def __init__(
        self,
        fn: BatchFn[T, R],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        concurrency: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max_wait_ms / 1000.0
        self.concurrency = max(1, int(concurrency))
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._running: dict[int, list[tuple[T, asyncio.Future[R]]]] = {}

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    async def start(self) -> None:
        """Start the batching loop on the running event loop (call from the app's lifespan)."""
        if not self.enabled or self._worker is not None:
            return
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="leaflens-batch")
        self._worker = asyncio.create_task(self._loop(), name="leaflens-micro-batcher")

    async def stop(self) -> None:
        """Stop the loop; items still queued fail with :class:`BatcherClosedError`."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._batches):
            task.cancel()
        pending = [entry for batch in self._running.values() for entry in batch]
        if self._queue is not None:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
        for _, future in pending:  # nobody may be left waiting forever
            if not future.done():
                future.set_exception(BatcherClosedError("the server is shutting down"))
        self._running.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: T) -> R:
        """Run ``item`` in the next batch and return its own result."""
        if not self.enabled:
            results = await run_in_threadpool(self.fn, [item])
            self._check(results, 1)
            if self.on_batch is not None:
                self.on_batch(1)
            return results[0]
        if self._queue is None or self._worker is None:
            raise BatcherClosedError("the batcher is not running (was the app's lifespan started?)")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            # Wait for a free slot before taking items: while every slot is busy, the queue fills up and the
            # next batch is bigger.
            await self._slots.acquire()
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                # Take what is already waiting first; only then wait (bounded) for more.
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            task = asyncio.create_task(self._run(batch))
            self._running[id(task)] = batch
            self._batches.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._running.pop(id(task), None)
        if self._slots is not None:
            self._slots.release()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, items)
            self._check(results, len(items))
        except Exception as err:  # every caller of the batch gets the error; the loop keeps serving
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        if self.on_batch is not None:
            self.on_batch(len(items))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # the caller may have gone away (client disconnect)
                future.set_result(result)

    @staticmethod
    def _check(results: Sequence[R], expected: int) -> None:
        if len(results) != expected:
            raise RuntimeError(f"batch function returned {len(results)} results for {expected} items")
