"""``pmlb node --workers N``: one node, N processes, one per core by default.

Python runs one thread of bytecode at a time, so one process uses one core.
A node of several workers is still **one node**: one id, one etcd entry, one
admin address, one control address, one DNS record, marks that name it. What
is per process stays inside.

The supervisor (the process the operator started) is the node's face:

* it checks the addresses the node will use before anything starts (the
  client listeners and the control address must be free; it binds the admin
  address itself), so a port held by another program is one clear start-up
  error, never a worker that accepts clients and then dies;
* it starts the workers in two steps: each worker binds and starts everything
  it needs except the client listeners and says "prepared"; only when every
  worker is prepared are they told to listen. A worker that cannot start makes
  the node refuse to start, with the worker's own error in one line, and no
  client was ever accepted;
* it registers ``<prefix>/nodes/<id>`` (listing the workers) and the DNS
  record under its own lease, and revokes it first when stopping;
* it serves the node's admin address, answering from every worker
  (pmlb.node.aggregate): /metrics sums them, /connections, mark
  search, /api/status and the page cover all of them, /drain drains all;
* it restarts a worker that exits unexpectedly (50 ms doubling to 5 s,
  starting over after a minute of running); a restarted worker listens again
  only once it is whole;
* SIGHUP reaches every worker (reload); SIGTERM/SIGINT drains them all; a
  second signal makes them exit at once. Workers run in their own process
  group, so a Ctrl-C in a terminal reaches them once, through the supervisor;
  if the supervisor is killed, the kernel sends each worker SIGTERM
  (PR_SET_PDEATHSIG) and they drain.

Each worker serves the node's control address too (gRPC sets SO_REUSEPORT),
its own admin endpoint and control API on Unix sockets in a private run
directory (mode 0700), and campaigns for the checker role as the node.
--max-connections counts every worker's connections (a shared counter per
worker in that directory); --accept-rate is split equally between the
workers; --max-per-client is per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pmlb.aio import Backoff, fd_ready, wait_event
from pmlb.config import NodeConfig
from pmlb.dataplane.siblings import create_counters
from pmlb.errors import ConfigError, PmlbError
from pmlb.node import sdnotify
from pmlb.node.handover import ENV as HANDOVER_ENV
from pmlb.node.handover import handover_socket
from pmlb.protocol.domain import format_hostport

log = logging.getLogger("pmlb.workers")

RESTART_INITIAL: Final = 0.05
RESTART_MAX: Final = 5.0
RESTART_RESET_AFTER: Final = 60.0
# A worker that has not said "prepared" by then failed to start (the etcd
# view alone may take 5 s to arrive; links connect in the background).
START_TIMEOUT: Final = 60.0
_PR_SET_PDEATHSIG: Final = 1
# How the supervisor tells a worker who it is (not a PMLB_* option: users
# never set it).
ROLE_ENV: Final = "_PMLB_WORKER"


def default_workers() -> int:
    """The number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def check_workers(config: NodeConfig, n: int) -> None:
    if any(port == 0 for _, port in config.listen):
        raise ConfigError(f"--workers {n} needs fixed --listen ports (port 0 differs per worker)")


# -- the worker's side ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Who this process is within its node, as its supervisor said."""

    index: int
    count: int
    rundir: str
    fd: int  # a stream socket to the supervisor

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        raw = os.environ.get(ROLE_ENV)
        if not raw:
            return None
        try:
            obj = json.loads(raw)
            return cls(int(obj["index"]), int(obj["count"]), str(obj["rundir"]), int(obj["fd"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{ROLE_ENV} is not what a supervisor sets: {exc}") from None

    def config(self, config: NodeConfig) -> NodeConfig:
        """The part of the node's limits this worker applies (--max-connections
        is counted node-wide instead, pmlb.dataplane.siblings.NodeCounters)."""
        return dataclasses.replace(config, accept_rate=config.accept_rate / self.count)


class SupervisorChannel:
    """The worker's end of its socket to the supervisor: JSON lines out
    (prepared, ready, error), one line in ("go": start listening)."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._sock = socket.socket(fileno=role.fd)

    def say(self, event: str, **fields: Any) -> None:
        """A few bytes on a local socket nobody else writes: sent at once."""
        line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
        with contextlib.suppress(OSError):  # the supervisor is gone: PDEATHSIG follows
            self._sock.sendall(line.encode())

    async def wait_go(self) -> None:
        """Until the supervisor says every worker is prepared."""
        self._sock.setblocking(False)
        try:
            async with asyncio.timeout(START_TIMEOUT * 2):
                line = await asyncio.get_running_loop().sock_recv(self._sock, 64)
        finally:
            self._sock.setblocking(True)
        if line.strip() != b"go":
            raise PmlbError("the supervisor went away before the node started")

    async def commands(self, handler: Callable[[str], object]) -> None:
        """The supervisor's lines after "go" ("handover"), until it goes away.
        The socket stays blocking for say(); reads never block (MSG_DONTWAIT)."""
        fd = self._sock.fileno()
        buf = b""
        while True:
            await fd_ready(fd)
            try:
                data = self._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                handler(line.decode(errors="replace").strip())
            buf = buf[-256:]  # a line is a word: nothing longer is kept

    def close(self) -> None:
        self._sock.close()


@functools.cache
def supervisor_channel(role: WorkerRole) -> SupervisorChannel:
    """The one channel of this process (one socket object owns the fd)."""
    return SupervisorChannel(role)


# -- the supervisor's side -----------------------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def check_bindable(host: str, port: int, what: str) -> None:
    """Raise PmlbError when ``host:port`` cannot be bound (another program
    holds it). SO_REUSEADDR: a port in TIME_WAIT is free to take."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PmlbError(
                f"{what} {format_hostport(host, port)} is not available: {exc.strerror or exc}"
            ) from None


def _predecessor(workers: int) -> dict[str, Any] | None:
    """What the node's previous supervisor passed on (a live handover), or
    None; the worker count must be the same (worker i takes over from i)."""
    raw = os.environ.pop(HANDOVER_ENV, None)
    if not raw:
        return None
    try:
        taking = json.loads(raw)
        count = int(taking["workers"])
        str(taking["rundir"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PmlbError(f"${HANDOVER_ENV} is not what a node sets: {exc}") from None
    if count != workers:
        raise PmlbError(
            f"the running node has {count} workers and this one would have {workers}: "
            "a handover needs the same --workers (restart the node to change it)"
        )
    return dict(taking)


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Worker:
    """One worker process, started again when it exits unexpectedly."""

    def __init__(self, index: int, count: int, argv: Sequence[str], rundir: str) -> None:
        self.index = index
        self.count = count
        self.argv = list(argv)
        self.rundir = rundir
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.prepared = asyncio.Event()
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.error = ""  # what stopped it from starting, in its own words
        self.config_error = False  # ... and whether that was its configuration
        # Live handover (pmlb.node.handover): where the first start of a
        # successor's worker finds its predecessor; what this one reported.
        self.handover_env = ""
        self.handover: asyncio.Future[str] | None = None  # "" done, else why not
        self.handed_over = False
        self._go: asyncio.StreamWriter | None = None
        self._listener: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def up(self) -> bool:
        return self.ready.is_set() and not self.exited.is_set()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    def go(self) -> None:
        if self._go is not None:
            self._go.write(b"go\n")

    def cancel_handover(self) -> None:
        if self._go is not None and self.handover is not None and not self.handover.done():
            self._go.write(b"handover-cancel\n")

    def hand_over(self) -> asyncio.Future[str]:
        """Ask the worker to hand over to its successor (which will connect to
        handover_socket(rundir, index)); resolves to "" or why it failed."""
        self.handover = asyncio.get_running_loop().create_future()
        if self._go is None or not self.up:
            self.handover.set_result("the worker is not running")
        else:
            self._go.write(b"handover\n")
        return self.handover

    async def spawn(self) -> None:
        self.prepared.clear()
        self.ready.clear()
        self.exited.clear()
        self.error = ""
        ours, theirs = socket.socketpair()
        role = {"index": self.index, "count": self.count, "rundir": self.rundir}
        env = {**os.environ, ROLE_ENV: json.dumps({**role, "fd": theirs.fileno()})}
        env.pop(sdnotify.ENV, None)  # the supervisor alone speaks to systemd
        env.pop(HANDOVER_ENV, None)
        if self.handover_env:  # the first start only: a restart starts afresh
            env[HANDOVER_ENV], self.handover_env = self.handover_env, ""
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        finally:
            theirs.close()
        reader, self._go = await asyncio.open_connection(sock=ours)
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)
        self._listener = asyncio.get_running_loop().create_task(self._listen(reader, self.proc))

    async def _listen(self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
        """The worker's events until it exits."""
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):
                line = b""
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event") if isinstance(event, dict) else None
            if kind == "prepared":
                self.prepared.set()
            elif kind == "ready":
                self.ready.set()
                log.info("worker %d (pid %d) is listening", self.index, proc.pid)
            elif kind == "error":
                self.error = str(event.get("error", ""))[:500]
                self.config_error = bool(event.get("config"))
            elif kind == "handover" and self.handover is not None and not self.handover.done():
                why = str(event.get("error", ""))[:500]
                self.handed_over = not why
                self.handover.set_result(why)
        rc = await proc.wait()
        if not self.error and not self.ready.is_set():
            self.error = f"exited with status {rc} before it was ready"
        if self._go is not None:
            self._go.close()
            self._go = None
        self.exited.set()


class Supervisor:
    """Runs the node's workers; see the module docstring."""

    def __init__(self, config: NodeConfig, argv: Sequence[str], n: int) -> None:
        check_workers(config, n)
        self.config = config
        self.count = n
        self.argv = list(argv)
        self.rundir = ""
        self.workers: list[Worker] = []
        self.started_at = ""
        self.started_unix = time.time()
        self.control_port = config.control[1] if config.control else 0
        self.stop_event: asyncio.Event | None = None
        self.session: Any = None  # pmlb.cluster.session.Session with --etcd
        self.admin: Any = None  # pmlb.observability.admin.AdminServer with --admin
        # Live handover: what the predecessor said (this supervisor is a
        # successor), and this one's own handover to a successor.
        self.taking: dict[str, Any] | None = None
        self._handing: asyncio.Task[None] | None = None
        self.handed_over = False

    def reload(self) -> None:
        """SIGHUP: every worker re-reads its configuration."""
        for w in self.workers:
            w.signal(signal.SIGHUP)

    def hand_over(self) -> None:
        """SIGUSR2: start a successor node from this command line; each worker
        hands its listeners and connections to the successor's namesake."""
        if self._handing is not None and not self._handing.done():
            log.warning("handover: one is under way already; this request is ignored")
            return
        if self.stop_event is None or self.stop_event.is_set() or not self.workers:
            log.warning("handover: this node is not serving; nothing to hand over")
            return
        self._handing = asyncio.get_running_loop().create_task(self._give())

    async def _give(self) -> None:
        results = [w.hand_over() for w in self.workers]  # each waits for its successor
        admin = self.admin.listening_socket() if self.admin is not None else None
        env = {**os.environ}
        env[HANDOVER_ENV] = json.dumps(
            {
                "rundir": self.rundir,
                "workers": self.count,
                "control_port": self.control_port,
                "admin_fd": admin.fileno() if admin is not None else -1,
            }
        )
        argv = [sys.executable, "-m", "pmlb", *self.argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # it outlives us
                pass_fds=(admin.fileno(),) if admin is not None else (),
                env=env,
            )
        except OSError as exc:
            log.error("handover failed, the node carries on: cannot start a successor: %s", exc)
            return  # the workers stop waiting for it after their HELLO_TIMEOUT
        log.info("handover: started the successor node (pid %d)", proc.pid)
        exited = asyncio.ensure_future(proc.wait())
        waits: set[asyncio.Future[Any]] = {exited, *results}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        while exited.done() and not all(r.done() for r in results):
            # It will not connect now: the workers still waiting stop waiting.
            log.error("handover: the successor node exited with status %d", exited.result())
            for w in self.workers:
                w.cancel_handover()
            await asyncio.wait(results)
        whys = await asyncio.gather(*results)
        failed = [f"worker {i}: {why}" for i, why in enumerate(whys) if why]
        if exited.done():  # whatever its workers took, they do not keep
            failed.append(f"the successor node exited with status {exited.result()}")
        if not failed:
            log.info(
                "handover done: the successor node (pid %d) serves every worker's clients", proc.pid
            )
            self.handed_over = True
            if self.stop_event is not None:
                self.stop_event.set()
            return
        # Some worker kept its clients: the successor cannot run beside it (one
        # node id). It goes, with whatever it had taken; the workers that had
        # handed over start again here.
        log.error(
            "handover failed, the node carries on (%s); stopping the successor (pid %d)",
            "; ".join(failed),
            proc.pid,
        )
        for w in self.workers:
            w.handed_over = False
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        await exited

    def force(self) -> None:
        """A second SIGTERM/SIGINT: the workers exit at once too."""
        for w in self.workers:
            w.signal(signal.SIGTERM)

    def _preflight(self) -> list[str]:
        """Check every address before a process starts; the extra flags the
        workers need (a control port chosen here when the config says 0)."""
        cfg = self.config
        taking = self.taking  # the predecessor holds these addresses
        if taking is None:
            for host, port in cfg.listen:
                check_bindable(host, port, "client listener")
        extra = ["--workers", "1", "--reuse-port"]
        if cfg.control is not None:
            host, port = cfg.control
            if port == 0:
                port = int(taking["control_port"]) if taking else free_port(host)
                extra += ["--control", format_hostport(host, port)]
            if taking is None:
                check_bindable(host, port, "control address")
            self.control_port = port
        return extra

    async def run(self, stop: asyncio.Event) -> int:
        """Start, serve until ``stop``, drain; the exit status is the worst of
        the workers'. Raises PmlbError when the node cannot start."""
        from pmlb.store.keys import now_rfc3339

        self.stop_event = stop
        self.started_at = now_rfc3339()
        self.taking = _predecessor(self.count)
        extra = self._preflight()
        self.rundir = tempfile.mkdtemp(prefix=f"pmlb-{self.config.node_id}-")
        create_counters(self.rundir, self.count)
        base = [sys.executable, "-m", "pmlb", *self.argv, *extra]
        self.workers = [Worker(i, self.count, base, self.rundir) for i in range(self.count)]
        if self.taking is not None:
            for w in self.workers:  # each takes over from its predecessor's namesake
                path = handover_socket(str(self.taking["rundir"]), w.index)
                w.handover_env = json.dumps({"path": path})
        try:
            await self._start_admin()
            await self._start_workers()
            return await self._serve(stop)
        finally:
            if self.admin is not None:
                await self.admin.stop()
            shutil.rmtree(self.rundir, ignore_errors=True)

    async def _start_admin(self) -> None:
        if self.config.admin is None:
            return
        from pmlb.node.aggregate import node_admin

        self.admin = node_admin(self)
        fd = int(self.taking.get("admin_fd", -1)) if self.taking else -1
        await self.admin.start(socket.socket(fileno=fd) if fd >= 0 else None)

    async def _start_workers(self) -> None:
        """Every worker prepared, then every worker listening; or none."""
        for w in self.workers:
            await w.spawn()
        for phase in ("prepared", "ready"):
            failed = await self._wait_all(phase)
            if failed is not None:
                await self._abort()
                kind = ConfigError if failed.config_error else PmlbError
                raise kind(f"worker {failed.index} could not start: {failed.error}")
            if phase == "prepared":
                for w in self.workers:
                    w.go()
        log.info(
            "node %s: %d workers listening on %s",
            self.config.node_id,
            len(self.workers),
            ", ".join(format_hostport(h, p) for h, p in self.config.listen),
        )

    async def _wait_all(self, phase: str) -> Worker | None:
        """Wait until every worker reached ``phase``; the first that failed."""
        deadline = time.monotonic() + START_TIMEOUT
        for w in self.workers:
            reached = w.prepared if phase == "prepared" else w.ready
            waits = {
                asyncio.ensure_future(reached.wait()),
                asyncio.ensure_future(w.exited.wait()),
            }
            _, pending = await asyncio.wait(
                waits,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if w.exited.is_set() or not reached.is_set():
                w.error = w.error or f"not {phase} within {START_TIMEOUT:.0f}s"
                return w
        return None

    async def _abort(self) -> None:
        for w in self.workers:
            w.signal(signal.SIGTERM)
        for w in self.workers:
            if w.proc is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await w.proc.wait()

    async def _serve(self, stop: asyncio.Event) -> int:
        store = await self._register()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._keep(w, stopping)) for w in self.workers]
        if store is None:  # every worker listens by now (with etcd: once registered)
            await sdnotify.ReadyOnce(main_pid=self.taking is not None)()
        await stop.wait()
        if not self.handed_over:  # else the successor is systemd's main process
            sdnotify.notify("STOPPING=1")
        stopping.set()
        # Leave etcd and DNS first, so nobody routes to the node while it drains.
        if self.session is not None:
            await self.session.stop(revoke=True)
        log.info("stopping: asking %d workers to drain", len(self.workers))
        for w in self.workers:
            if not w.handed_over:  # those are on their way out already
                w.signal(signal.SIGTERM)
        codes = await asyncio.gather(*tasks)
        if store is not None:
            await store.close()
        log.info("all workers stopped (statuses %s)", ", ".join(map(str, codes)))
        return max(codes, key=abs, default=0)

    async def _keep(self, w: Worker, stopping: asyncio.Event) -> int:
        """Restart ``w`` whenever it exits, until the node stops."""
        backoff = Backoff(RESTART_INITIAL, RESTART_MAX)
        started = time.monotonic()
        while True:
            await w.exited.wait()
            assert w.proc is not None
            rc = w.proc.returncode or 0
            if stopping.is_set() or w.handed_over:
                log.info("worker %d exited with status %d", w.index, rc)
                return rc
            backoff.reset_if_up(started, RESTART_RESET_AFTER)
            delay = backoff.next()
            w.restarts += 1
            log.error(
                "worker %d (pid %d) exited unexpectedly with status %d%s; restart %d in %.2fs",
                w.index,
                w.pid,
                rc,
                f" ({w.error})" if w.error and not w.ready.is_set() else "",
                w.restarts,
                delay,
            )
            if await wait_event(stopping, delay):
                return rc  # asked to stop while waiting: do not restart
            started = time.monotonic()
            await w.spawn()
            # Listen as soon as it is whole: the node is up already.
            prepared = asyncio.ensure_future(w.prepared.wait())
            exited = asyncio.ensure_future(w.exited.wait())
            await asyncio.wait({prepared, exited}, return_when=asyncio.FIRST_COMPLETED)
            prepared.cancel()
            exited.cancel()
            if w.prepared.is_set() and not w.exited.is_set():
                w.go()

    async def _register(self) -> Any:
        """Put the node's entry (and DNS record) in etcd under the
        supervisor's lease; the store, to close at the end."""
        cfg = self.config
        if not cfg.etcd:
            return None
        from pmlb.cluster.registration import Registration, node_entry
        from pmlb.cluster.session import Session
        from pmlb.store.etcd import EtcdStore, node_settings
        from pmlb.store.keys import Keys

        store = EtcdStore(node_settings(cfg))
        await store.connect()
        admin = (self.admin.host, self.admin.port) if self.admin is not None else None
        registration = Registration(
            store,
            Keys(cfg.etcd_prefix),
            cfg,
            lambda: node_entry(
                cfg, cfg.listen, self.control_port, admin, self.started_at, len(self.workers)
            ),
            lambda: cfg.listen[0][0],
        )
        self.session = Session(store, cfg.lease_ttl)
        self.session.on_new_lease(registration)
        # After the registration; a successor is the main process from now on.
        self.session.on_new_lease(sdnotify.ReadyOnce(main_pid=self.taking is not None))
        self.session.start()
        return store
