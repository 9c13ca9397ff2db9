"""The micro-batcher on its own, with a plain function for the engine (the API tests use the real one)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from leaflens.serving.batching import BatcherClosedError, MicroBatcher


class Recorder:
    """A batch function that squares its inputs and records every batch it was called with."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay, self.fail_on = delay, fail_on
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
            self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot handle {self.fail_on}")
        time.sleep(self.delay)
        return [i * i for i in items]


def run(coro):
    return asyncio.run(coro)


async def submit_all(batcher: MicroBatcher, items, return_exceptions=False):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=return_exceptions)
    finally:
        await batcher.stop()


def test_every_caller_gets_its_own_result_in_bounded_batches():
    fn = Recorder(delay=0.01)
    results = run(submit_all(MicroBatcher(fn, max_batch_size=8, max_wait_ms=50), range(30)))
    assert results == [i * i for i in range(30)]
    assert max(len(b) for b in fn.batches) <= 8
    assert len(fn.batches) < 30  # concurrent submissions were batched
    assert sorted(i for b in fn.batches for i in b) == list(range(30))  # each item ran exactly once
    assert len(fn.threads) == 1 and next(iter(fn.threads)).startswith("leaflens-batch")


def test_a_lone_request_waits_at_most_max_wait():
    fn = Recorder()

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=32, max_wait_ms=30)
        await batcher.start()
        start = time.perf_counter()
        result = await batcher.submit(7)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return result, elapsed

    result, elapsed = run(scenario())
    assert result == 49 and fn.batches == [[7]]
    assert 0.025 <= elapsed < 1.0


def test_a_full_batch_runs_without_waiting():
    fn = Recorder()

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=4, max_wait_ms=10_000)
        await batcher.start()
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return results, elapsed

    results, elapsed = run(scenario())
    assert results == [0, 1, 4, 9] and fn.batches == [[0, 1, 2, 3]]
    assert elapsed < 5.0  # far below the 10 s wait: a full batch does not wait


def test_a_failing_batch_fails_its_callers_and_the_batcher_keeps_serving():
    fn = Recorder(fail_on=3)

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        first = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        second = await batcher.submit(5)
        await batcher.stop()
        return first, second

    first, second = run(scenario())
    assert all(isinstance(r, ValueError) and "cannot handle 3" in str(r) for r in first)
    assert second == 25


def test_a_wrong_number_of_results_is_an_error():
    batcher = MicroBatcher(lambda items: [0], max_batch_size=4, max_wait_ms=20)
    results = run(submit_all(batcher, range(3), return_exceptions=True))
    assert all(isinstance(r, RuntimeError) and "1 results for 3 items" in str(r) for r in results)


def test_batching_off_calls_the_function_once_per_item_concurrently():
    fn = Recorder(delay=0.05)
    sizes: list[int] = []
    batcher = MicroBatcher(fn, max_batch_size=1, max_wait_ms=5, on_batch=sizes.append)
    assert not batcher.enabled
    start = time.perf_counter()
    results = run(submit_all(batcher, range(6)))
    assert results == [i * i for i in range(6)]
    assert fn.batches == [[i] for i in range(6)] or sorted(fn.batches) == [[i] for i in range(6)]
    assert sizes == [1] * 6
    assert time.perf_counter() - start < 6 * 0.05  # ran on the thread pool, not one after another


def test_on_batch_reports_batch_sizes():
    sizes: list[int] = []
    batcher = MicroBatcher(Recorder(), max_batch_size=5, max_wait_ms=50, on_batch=sizes.append)
    run(submit_all(batcher, range(12)))
    assert sum(sizes) == 12 and max(sizes) <= 5


def test_submit_before_start_and_after_stop_is_refused():
    batcher = MicroBatcher(Recorder(), max_batch_size=4, max_wait_ms=5)

    async def scenario():
        with pytest.raises(BatcherClosedError):
            await batcher.submit(1)
        await batcher.start()
        assert await batcher.submit(2) == 4
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(3)

    run(scenario())


def test_negative_wait_is_rejected():
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(Recorder(), max_wait_ms=-1)


def test_stop_while_a_batch_runs_fails_its_callers_instead_of_hanging():
    fn = Recorder(delay=0.3)

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=2, max_wait_ms=1)
        await batcher.start()
        calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0.1)  # the first batch is running, the second is queued
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=5)

    results = run(scenario())
    assert all(isinstance(r, BatcherClosedError) for r in results)


def test_concurrent_batches_overlap_up_to_the_limit():
    active, peak = 0, 0
    lock = threading.Lock()

    def slow(items: list[int]) -> list[int]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return items

    batcher = MicroBatcher(slow, max_batch_size=2, max_wait_ms=0, concurrency=2)
    assert run(submit_all(batcher, range(12))) == list(range(12))
    assert peak == 2
