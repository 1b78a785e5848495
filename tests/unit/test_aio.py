"""Cancellation in pmlb.aio's waiting helpers: a stop must never be lost.

Found by the --workers test: a worker told to stop at the moment the checker
key changed kept campaigning and never exited, because Python 3.11's
``asyncio.wait_for`` returns the inner result instead of raising when the
cancellation and the inner completion land in the same loop iteration.
"""

from __future__ import annotations

import asyncio

import pytest

from pmlb import aio

pytestmark = pytest.mark.asyncio(loop_scope="function")


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
