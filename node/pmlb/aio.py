"""Event loop set-up and signal handling shared by every long-running command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

log = logging.getLogger("pmlb")
T = TypeVar("T")

# Restarts of supervised loops, by name (rendered as pmlb_task_restarts_total).
RESTARTS: Counter[str] = Counter()
RESTART_BACKOFF_MAX: Final = 5.0


async def supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop()`` for good: a bug that escapes it (anything but
    cancellation) is logged with its traceback, counted, and the loop starts
    again after a backoff (0.2 s doubling to 5 s, reset after a minute of
    running), instead of the task dying silently while the node carries on
    with a frozen view of the cluster."""
    backoff = 0.2
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            RESTARTS[name] += 1
            if asyncio.get_running_loop().time() - started > 60:
                backoff = 0.2
            log.exception(
                "%s failed unexpectedly (restart %d); restarting in %.1fs",
                name,
                RESTARTS[name],
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)


def run(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, T]],
    on_hup: Callable[[], object] | None = None,
    on_force: Callable[[], object] | None = None,
) -> T:
    """Run ``main(stop_event)`` on uvloop when available.

    The first SIGINT or SIGTERM sets the event (graceful stop); a second one
    exits at once with status 1, like uvicorn. SIGHUP calls ``on_hup`` (a
    reload) and never stops the process; without ``on_hup`` it is logged and
    ignored (its default action would kill the process). ``on_force`` runs
    just before a forced exit (a supervisor passes the signal on).
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
                if on_force is not None:
                    on_force()
                os._exit(1)

        def on_sighup() -> None:
            if on_hup is None:
                log.info("SIGHUP received: nothing to reload here")
                return
            log.info("SIGHUP received: reloading")
            try:
                on_hup()
            except Exception:  # a reload must never take the process down
                log.exception("reload failed; the running configuration is kept")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        return await main(stop)

    return runner(wrapper())
