"""Event loop set-up and signal handling shared by every long-running command."""

from __future__ import annotations

import asyncio
import contextlib
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


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; whether it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it returns instead of raising
    when a cancellation and the event land in the same loop iteration, and a
    loop waiting like that never stops (asyncio.timeout has no such race).
    An event that is set already returns at once without yielding to the
    loop: a loop around this must clear the event it waits on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


STOP_RECANCEL: Final = 0.1


async def stop_task(task: asyncio.Task[Any], what: str) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every
    STOP_RECANCEL seconds: a cancellation can be lost inside a library (see
    wait_event), and a stop must not hang on it. What the task raised is
    logged at debug level (it is being stopped; its errors were logged)."""
    retries = 0
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RECANCEL)
        retries += 1
        if retries == 2:
            log.warning("%s ignored a cancellation; cancelling again", what)
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", what, task.exception())


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
