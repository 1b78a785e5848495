"""Supervised loops restart after a bug instead of dying silently."""

from __future__ import annotations

import asyncio

import pytest

from pmlb import aio


@pytest.mark.asyncio
async def test_a_loop_that_raises_is_restarted_and_counted() -> None:
    runs = 0
    done = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RecursionError("a bug that escaped the loop")
        done.set()
        await asyncio.sleep(3600)

    before = aio.RESTARTS["test-loop"]
    task = asyncio.create_task(aio.supervised("test-loop", loop))
    async with asyncio.timeout(5):
        await done.wait()
    assert runs == 3
    assert aio.RESTARTS["test-loop"] - before == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
