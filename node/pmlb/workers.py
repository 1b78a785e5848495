"""``pmlb node --workers N``: one node process per core, sharing the listeners.

Python runs one thread of bytecode at a time, so one node process uses one
core. The supervisor here starts N ordinary node processes ("workers") that
bind the same client listeners with SO_REUSEPORT: the kernel spreads new
connections across them. Each worker is a node of its own in etcd:

* node id ``<id>-w<i>`` (so marks stay unique and name the worker that owns
  them: MarkClient and push reach the right worker through its registration);
* control and admin ports ``<port> + i`` (scrape each worker's /metrics;
  Prometheus relabelling can sum them);
* only worker 0 publishes the DNS record (``--dns-name``), so the host appears
  once; its lease outlives a crash-and-restart of worker 0 (TTL 10 s by default).

The supervisor restarts a worker that exits unexpectedly, with exponential
backoff (50 ms doubling to 5 s, starting over after a worker ran for a
minute), forwards SIGHUP (reload) to every worker, and on SIGTERM/SIGINT asks
every worker to drain and waits for them all; a second signal makes them exit
at once. Workers run in their own process group, so a Ctrl-C in a terminal
reaches them once, through the supervisor; if the supervisor is killed, the
kernel sends each worker SIGTERM (PR_SET_PDEATHSIG) and they drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Final

from pmlb.aio import wait_event
from pmlb.config import NodeConfig
from pmlb.domain import format_hostport
from pmlb.errors import ConfigError
from pmlb.ids import valid_node_id

log = logging.getLogger("pmlb.workers")

RESTART_INITIAL: Final = 0.05
RESTART_MAX: Final = 5.0
RESTART_RESET_AFTER: Final = 60.0
_PR_SET_PDEATHSIG: Final = 1


def default_workers() -> int:
    """The number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def worker_overrides(config: NodeConfig, i: int) -> list[str]:
    """Flags appended to the supervisor's own command line for worker ``i``
    (the last occurrence of a flag wins, so these take precedence)."""
    node_id = f"{config.node_id}-w{i}"
    if not valid_node_id(node_id):
        raise ConfigError(f"worker node id {node_id!r} is too long: shorten --node-id")
    args = ["--workers", "1", "--reuse-port", "--node-id", node_id]
    if config.admin is not None:
        host, port = config.admin
        args += ["--admin", format_hostport(host, port + i if port else 0)]
    if config.control is not None:
        host, port = config.control
        args += ["--control", format_hostport(host, port + i if port else 0)]
    if i > 0 and config.dns_name:
        args += ["--dns-name", ""]
    return args


def check_workers(config: NodeConfig, n: int) -> None:
    if any(port == 0 for _, port in config.listen):
        raise ConfigError(f"--workers {n} needs fixed --listen ports (port 0 differs per worker)")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Worker:
    def __init__(self, index: int, argv: Sequence[str]) -> None:
        self.index = index
        self.argv = list(argv)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def run(self, stopping: asyncio.Event) -> int:
        failures = 0
        while True:
            started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            log.info("worker %d started (pid %d)", self.index, self.proc.pid)
            rc = await self.proc.wait()
            if stopping.is_set():
                log.info("worker %d exited with status %d", self.index, rc)
                return rc
            if time.monotonic() - started >= RESTART_RESET_AFTER:
                failures = 0
            delay = min(RESTART_MAX, RESTART_INITIAL * 2 ** min(failures, 16))
            failures += 1
            self.restarts += 1
            log.error(
                "worker %d (pid %d) exited unexpectedly with status %d; restart %d in %.2fs",
                self.index,
                self.proc.pid,
                rc,
                self.restarts,
                delay,
            )
            if await wait_event(stopping, delay):
                return rc  # asked to stop while waiting: do not restart


class Supervisor:
    """Runs ``n`` workers until stopped; see the module docstring."""

    def __init__(self, config: NodeConfig, argv: Sequence[str], n: int) -> None:
        check_workers(config, n)
        self.config = config
        base = [sys.executable, "-m", "pmlb", *argv]
        self.workers = [Worker(i, base + worker_overrides(config, i)) for i in range(n)]

    def reload(self) -> None:
        """SIGHUP: every worker re-reads its configuration."""
        for w in self.workers:
            w.signal(signal.SIGHUP)

    def force(self) -> None:
        """A second SIGTERM/SIGINT: the workers exit at once too."""
        for w in self.workers:
            w.signal(signal.SIGTERM)

    async def run(self, stop: asyncio.Event) -> int:
        """The exit status is the worst of the workers'."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(w.run(stopping)) for w in self.workers]
        log.info(
            "supervising %d workers of node %s on %s",
            len(self.workers),
            self.config.node_id,
            ", ".join(format_hostport(h, p) for h, p in self.config.listen),
        )
        await stop.wait()
        stopping.set()
        log.info("stopping: asking %d workers to drain", len(self.workers))
        for w in self.workers:
            w.signal(signal.SIGTERM)
        codes = await asyncio.gather(*tasks)
        log.info("all workers stopped (statuses %s)", ", ".join(map(str, codes)))
        return max(codes, key=abs, default=0)
