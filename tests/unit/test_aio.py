"""Cancellation in pmlb.aio's waiting helpers: a stop must never be lost.

Found by the --workers test: a worker told to stop at the moment the checker
key changed kept campaigning and never exited, because Python 3.11's
``asyncio.wait_for`` returns the inner result instead of raising when the
cancellation and the inner completion land in the same loop iteration.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pmlb import aio


async def test_wait_event_is_cancelled_even_when_the_event_fires_at_the_same_time() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(aio.wait_event(event, 10.0))
    await asyncio.sleep(0)  # the waiter is now parked on the event
    event.set()
    waiter.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await waiter


async def test_wait_event_returns_whether_the_event_fired() -> None:
    event = asyncio.Event()
    async with asyncio.timeout(5):
        assert await aio.wait_event(event, 0.01) is False
        event.set()
        assert await aio.wait_event(event, 0.01) is True


async def test_stop_task_ends_a_task_that_swallows_a_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a lost cancellation looks like to the caller

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    # Bounded with asyncio.wait, which never cancels: a timeout that cancelled
    # stop_task would cancel the awaited task a second time and hide the bug.
    stopper = asyncio.ensure_future(aio.stop_task(task, "stubborn"))
    done, _ = await asyncio.wait({stopper}, timeout=2.0)
    try:
        assert stopper in done, "stop_task cancels again when a cancellation is lost"
        assert task.done()
        assert swallowed == 1
    finally:
        task.cancel()
        stopper.cancel()


def test_backoff_doubles_to_its_maximum_within_its_jitter() -> None:
    """The one retry policy (issue [18]): each delay is the doubled base,
    capped, less at most ``jitter`` of it; reset starts over."""
    b = aio.Backoff(0.05, 1.0, jitter=0.25)
    bases = [min(1.0, 0.05 * 2**i) for i in range(12)]
    delays = [b.next() for _ in bases]
    for base, delay in zip(bases, delays, strict=True):
        assert base * 0.75 <= delay <= base, (base, delay)
    assert b.failures == 12
    b.reset()
    assert 0.0375 <= b.next() <= 0.05
    exact = aio.Backoff(0.2, 2.0, jitter=0)
    assert [exact.next() for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    # thousands of failures in a row stay finite and capped
    exact.failures = 10_000
    assert exact.next() == 2.0


def test_backoff_starts_over_only_after_staying_up() -> None:
    b = aio.Backoff(0.1, 5.0, jitter=0)
    for _ in range(4):
        b.next()
    b.reset_if_up(0.0, 1.0)  # never came up: keep backing off
    assert b.failures == 4
    b.reset_if_up(time.monotonic(), 1.0)  # up just now: not long enough
    assert b.failures == 4
    b.reset_if_up(time.monotonic() - 2.0, 1.0)  # up for two seconds
    assert b.failures == 0


@pytest.mark.parametrize(("initial", "maximum", "jitter"), [(0, 1, 0), (2, 1, 0), (1, 2, 1)])
def test_backoff_refuses_a_policy_that_cannot_back_off(
    initial: float, maximum: float, jitter: float
) -> None:
    with pytest.raises(ValueError, match="bad backoff"):
        aio.Backoff(initial, maximum, jitter)
