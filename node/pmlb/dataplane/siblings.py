"""What one worker process of a node shares with the node's other workers.

A node started with ``--workers N`` is N processes sharing its listeners
(SO_REUSEPORT); see pmlb.node.workers. Two things must hold across them, and this
module is where the data plane gets them:

* **Calls reach the worker that holds the mark.** A mark names its worker
  (pmlb.protocol.ids). An upstream pushing over its link, or a client of the control
  API, may reach any worker; a worker hands a call for a sibling's mark to
  that sibling over its internal control socket (gRPC on a Unix socket in the
  node's private run directory), so nothing but the node's own processes can
  use it.
* **--max-connections counts the whole node.** Each worker publishes the
  client sockets it holds (open, or accepted and still being set up) in its
  own slot of a small shared file (one int64 per worker, written only by that
  worker). The check for room, the accept and publishing the new count happen
  under one lock all workers take (flock), so two workers never both take the
  last free slot; a client leaving only lowers a count, so it needs no lock.
* **One suspect on probation per upstream, node-wide.** After a link breaks,
  the marks whose frames were in flight are suspects; each is resumed on an
  upstream only while no other suspect is on probation there, so a poison
  message takes down the next upstream with nobody else's frames in flight.
  Workers hold separate links to the same upstream process, so "no other
  suspect" must count the siblings' too: a lock file per upstream (flock,
  released by the kernel if a worker dies) in the run directory. The rules
  are dataplane.probation's; this is the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from pmlb._proto.pmlb.v1 import node_pb2 as npb
from pmlb._proto.pmlb.v1 import node_pb2_grpc
from pmlb.errors import InvalidMark
from pmlb.protocol.ids import parse_mark

log = logging.getLogger("pmlb.siblings")

# Calls handed to siblings and not yet answered; past it a push is refused
# (counted, like any refused push) rather than queued without bound.
MAX_FORWARDS: Final = 1024
FORWARD_TIMEOUT: Final = 5.0


def control_socket(rundir: str, index: int) -> str:
    """The internal control socket of worker ``index``."""
    return os.path.join(rundir, f"w{index}.control")


def admin_socket(rundir: str, index: int) -> str:
    """The internal admin (HTTP) socket of worker ``index``."""
    return os.path.join(rundir, f"w{index}.admin")


COUNTERS_FILE: Final = "open-connections"


def create_counters(rundir: str, count: int) -> None:
    """The supervisor makes the shared counters file before any worker starts."""
    path = os.path.join(rundir, COUNTERS_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, 8 * count)
    finally:
        os.close(fd)


class NodeCounters:
    """Open connections of every worker of the node (see the module docstring)."""

    def __init__(self, rundir: str, index: int, count: int) -> None:
        self.index = index
        self.count = count
        path = os.path.join(rundir, COUNTERS_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, 8 * count)
        finally:
            os.close(fd)
        self._all = struct.Struct(f"={count}q")
        self._lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> NodeCounters:
        """Hold the admission lock: check, accept and publish as one step."""
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)

    def publish(self, open_here: int) -> None:
        struct.pack_into("=q", self._map, 8 * self.index, open_here)

    def total(self) -> int:
        return sum(self._all.unpack_from(self._map))

    def close(self) -> None:
        self.publish(0)
        self._map.close()
        os.close(self._lock)


class NodeProbation:
    """A lock per upstream shared by the node's workers: held while one of
    their suspects is on probation on that upstream."""

    def __init__(self, rundir: str) -> None:
        self.dir = Path(rundir)
        self._fds: dict[str, int] = {}
        self._held: dict[str, asyncio.TimerHandle | None] = {}

    def _fd(self, upstream: str) -> int:
        fd = self._fds.get(upstream)
        if fd is None:
            # Upstream ids are etcd key leaves: hashed, never used as a path.
            name = "probation-" + hashlib.sha256(upstream.encode()).hexdigest()[:24]
            fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds[upstream] = fd
        return fd

    def acquire(self, upstream: str) -> bool:
        """Take the lock for ``upstream``; False when a worker (this one
        included) has a suspect on probation there or just lost one."""
        if upstream in self._held:
            return False
        try:
            fcntl.flock(self._fd(upstream), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # the run directory is gone: the node is stopping
            log.warning("probation lock for %s unavailable: %s", upstream, exc)
            return False
        self._held[upstream] = None
        return True

    def release(self, upstream: str, hold: float = 0.0) -> None:
        """Let the next suspect of any worker go to ``upstream``, now or after
        ``hold`` seconds."""
        if upstream not in self._held or self._held[upstream] is not None:
            return
        if hold > 0:
            self._held[upstream] = asyncio.get_running_loop().call_later(
                hold, self._unlock, upstream
            )
            return
        self._unlock(upstream)

    def _unlock(self, upstream: str) -> None:
        self._held.pop(upstream, None)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fds[upstream], fcntl.LOCK_UN)

    def close(self) -> None:
        for handle in self._held.values():
            if handle is not None:
                handle.cancel()
        self._held.clear()
        for fd in self._fds.values():
            os.close(fd)  # closing drops the lock
        self._fds.clear()


@dataclass(slots=True)
class _Forward:
    """One push (payload) or close (payload None) handed to a sibling."""

    mark: str
    payload: bytes | None
    reason: str
    done: asyncio.Future[str]


class Siblings:
    """The node's other workers, reached over their internal control sockets."""

    def __init__(self, node_id: str, index: int, count: int, rundir: str) -> None:
        self.node_id = node_id
        self.index = index
        self.count = count
        self.rundir = rundir
        self.forwarded = 0
        self.in_flight = 0
        self._stubs: dict[int, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Per sibling, what is handed to it, in order: one sender task each,
        # so two pushes to one mark arrive in the order the upstream sent them.
        self._queues: dict[int, deque[_Forward]] = {}

    def owner(self, mark: str) -> int | None:
        """The sibling worker holding ``mark``, or None (ours, another node's,
        not a mark, or a worker this node does not have)."""
        try:
            parsed = parse_mark(mark)
        except InvalidMark:
            return None
        worker = parsed.worker
        if parsed.node_id != self.node_id or worker is None or worker == self.index:
            return None
        return worker if worker < self.count else None

    def stub(self, worker: int) -> node_pb2_grpc.NodeStub:
        found = self._stubs.get(worker)
        if found is None:
            channel = grpc.aio.insecure_channel("unix:" + control_socket(self.rundir, worker))
            found = (channel, node_pb2_grpc.NodeStub(channel))
            self._stubs[worker] = found
        return found[1]

    async def call(self, worker: int, method: str, request: Any) -> Any:
        """One control call on ``worker``; raises grpc.aio.AioRpcError."""
        return await getattr(self.stub(worker), method)(request, timeout=FORWARD_TIMEOUT)

    def push(
        self, worker: int, mark: str, payload: bytes | None, reason: str = ""
    ) -> asyncio.Future[str] | None:
        """Hand an upstream's Data (``payload``) or Close for ``mark`` to
        ``worker``, in order, without waiting. The future says how it ended:
        "ok", "not_found" (the sibling does not hold the mark) or "error";
        None when too many are in flight (refused)."""
        if self.in_flight >= MAX_FORWARDS:
            return None
        self.in_flight += 1
        self.forwarded += 1
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(worker)
        if queue is None:
            queue = self._queues[worker] = deque()
        queue.append(_Forward(mark, payload, reason, done))
        if len(queue) == 1:
            task = asyncio.get_running_loop().create_task(self._send(worker, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return done

    async def _send(self, worker: int, queue: deque[_Forward]) -> None:
        """Forward ``queue`` to ``worker`` until it is empty; consecutive
        payloads for one mark go in one Send."""
        while queue:
            first = queue[0]
            batch = [first]
            if first.payload is not None:
                for f in itertools.islice(queue, 1, None):
                    if f.mark != first.mark or f.payload is None:
                        break
                    batch.append(f)
            request: Any
            if first.payload is not None:
                method = "Send"
                request = npb.SendRequest(
                    mark=first.mark, payloads=[f.payload for f in batch if f.payload is not None]
                )
            else:
                method, request = "Close", npb.CloseRequest(mark=first.mark, reason=first.reason)
            outcome = "ok"
            try:
                await self.call(worker, method, request)
            except grpc.aio.AioRpcError as exc:
                # NOT_FOUND: the mark closed meanwhile, as it may on one worker too.
                outcome = "not_found" if exc.code() == grpc.StatusCode.NOT_FOUND else "error"
                log.log(
                    logging.DEBUG if outcome == "not_found" else logging.WARNING,
                    "%s for mark %s handed to worker %d: %s",
                    method,
                    first.mark,
                    worker,
                    exc.code().name,
                )
            except asyncio.CancelledError:
                outcome = "error"
                raise
            finally:
                for f in batch:
                    queue.popleft()
                    self.in_flight -= 1
                    if not f.done.done():
                        f.done.set_result(outcome)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for queue in self._queues.values():
            for f in queue:
                if not f.done.done():
                    f.done.set_result("error")
        self._queues.clear()
        for channel, _ in self._stubs.values():
            await channel.close(grace=None)
        self._stubs.clear()
