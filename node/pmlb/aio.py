"""Event loop set-up and signal handling shared by every long-running command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("pmlb")
T = TypeVar("T")


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(stop_event)`` on uvloop when available.

    The first SIGINT or SIGTERM sets the event (graceful stop); a second one
    exits at once with status 1, like uvicorn.
    """
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, T]], T] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def wrapper() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        hits = 0

        def on_signal(signame: str) -> None:
            nonlocal hits
            hits += 1
            if hits == 1:
                log.info("%s received: stopping (send it again to force)", signame)
                stop.set()
            else:
                log.warning("%s received again: exiting now", signame)
                os._exit(1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        return await main(stop)

    return runner(wrapper())
