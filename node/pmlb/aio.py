"""Event loop set-up and signal handling shared by every long-running command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

log = logging.getLogger("pmlb")
T = TypeVar("T")


class Backoff:
    """The one retry delay policy of the package: exponential from
    ``initial`` (doubling per failure) up to ``maximum``, with up to
    ``jitter`` of each delay taken off at random so that peers that failed
    together do not retry together. ``reset()`` after a success; a loop that
    stays up for a while calls ``reset_if_up(since, after)``.

    Every reconnecting or restarting loop uses it (links, the etcd session,
    discovery, DNS sync, workers, supervised tasks, etcd calls), so their
    limits are named where each is made and nothing else counts failures."""

    __slots__ = ("failures", "initial", "jitter", "maximum")

    def __init__(self, initial: float, maximum: float, jitter: float = 0.25) -> None:
        if not 0 < initial <= maximum or not 0 <= jitter < 1:
            raise ValueError(f"bad backoff {initial}..{maximum} jitter {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0  # consecutive, since the last reset

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        base = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return base * (1 - self.jitter * random.random())

    def reset(self) -> None:
        self.failures = 0

    def reset_if_up(self, since: float, after: float) -> None:
        """Start over if the attempt begun at monotonic ``since`` (0: never
        up) held for ``after`` seconds: a flapping peer keeps backing off, one
        that stayed up is retried at once."""
        if since and time.monotonic() - since >= after:
            self.failures = 0

    async def sleep(self) -> float:
        """Sleep for ``next()``; the delay slept."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay


# Restarts of supervised loops, by name (rendered as pmlb_task_restarts_total).
RESTARTS: Counter[str] = Counter()
RESTART_BACKOFF: Final = (0.2, 5.0)  # supervised loops: 0.2 s doubling to 5 s


async def supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop()`` for good: a bug that escapes it (anything but
    cancellation) is logged with its traceback, counted, and the loop starts
    again after a backoff (0.2 s doubling to 5 s, reset after a minute of
    running), instead of the task dying silently while the node carries on
    with a frozen view of the cluster."""
    backoff = Backoff(*RESTART_BACKOFF)
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            RESTARTS[name] += 1
            backoff.reset_if_up(started, 60)
            delay = backoff.next()
            log.exception(
                "%s failed unexpectedly (restart %d); restarting in %.1fs",
                name,
                RESTARTS[name],
                delay,
            )
            await asyncio.sleep(delay)


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
    on_usr2: Callable[[], object] | None = None,
) -> T:
    """Run ``main(stop_event)`` on uvloop when available.

    The first SIGINT or SIGTERM sets the event (graceful stop); a second one
    exits at once with status 1, like uvicorn. SIGHUP calls ``on_hup`` (a
    reload) and never stops the process; without ``on_hup`` it is logged and
    ignored (its default action would kill the process). ``on_force`` runs
    just before a forced exit (a supervisor passes the signal on). SIGUSR2
    calls ``on_usr2`` (a live handover); without it, it is logged and ignored.
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

        def on_sigusr2() -> None:
            if on_usr2 is None:
                log.info("SIGUSR2 received: nothing to hand over here")
                return
            log.info("SIGUSR2 received: handing over to a successor")
            try:
                on_usr2()
            except Exception:  # never takes the process down
                log.exception("handover could not start; carrying on")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        loop.add_signal_handler(signal.SIGUSR2, on_sigusr2)
        return await main(stop)

    return runner(wrapper())


async def fd_ready(fd: int, write: bool = False) -> None:
    """Until ``fd`` is readable (or writable): one wait on the running loop,
    for sockets read with calls asyncio has no coroutine for (recvmsg with
    descriptors, MSG_DONTWAIT on a blocking socket)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
