"""Live handover: a node process hands its listeners and its client
connections, marks and all, to a successor on the same host (``SIGUSR2``).

The giver (the running process) starts the successor from its own command
line with one end of a private Unix socket pair (``$_PMLB_HANDOVER`` names
the descriptor), and the two speak ``pb.HandoverMessage`` over it (see
proto/pmlb/v1/handover.proto), descriptors riding along (SCM_RIGHTS)::

    taker                                  giver
      starts, follows etcd       hello ->
                                       <- listeners  (+ listening sockets)
      listens on them          listening ->
                                          stops accepting, admin and control
                                       <- marks      (+ one socket per mark)
      owns them now               taken ->
                                          forgets them
                                       <- ... more batches ...
                                       <- done
      says READY (MAINPID) to systemd     leaves etcd, drains what stayed, exits

At every moment each connection has exactly one owner: the giver until the
taker's ``taken`` arrives (the giver holds its own descriptor until then),
the taker after. So:

* a successor that fails before ``listening`` (it cannot start, it exits, it
  says ``abort``, it does not answer within HELLO_TIMEOUT) changes nothing:
  the giver never stopped serving, and says why the handover failed;
* a successor that dies later takes with it the marks it had taken (their
  clients see the connection close); the giver takes back the batch in
  flight from its own descriptors, listens again and carries on;
* a handover can be tried again (another ``SIGUSR2``) after one failed.

The data plane's half (which connections move, their state, letting go and
adopting) is ``pmlb.dataplane.handoff``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from pmlb import __version__
from pmlb._proto.pmlb.v1 import handover_pb2 as hpb
from pmlb.aio import fd_ready
from pmlb.dataplane import handoff
from pmlb.errors import PmlbError

if TYPE_CHECKING:
    from pmlb.dataplane.plane import DataPlane

log = logging.getLogger("pmlb.handover")

ENV: Final = "_PMLB_HANDOVER"  # set by the giver only: not a user option
FORMAT: Final = 1  # HandoverHello.format this version speaks
# The successor may take this long to be ready to take over (it follows etcd
# first, as any node starts); each later answer must come within STEP_TIMEOUT.
HELLO_TIMEOUT: Final = 60.0
STEP_TIMEOUT: Final = 30.0
LINKS_WAIT: Final = 5.0
CONNECT_WAIT: Final = 10.0
MAX_MESSAGE: Final = 64 << 20  # a batch is bounded by handoff.BATCH_BYTES
MAX_FDS: Final = 253  # SCM_MAX_FD
_HEADER: Final = struct.Struct(">I")


class HandoverError(PmlbError):
    """The handover cannot go on; the message says why."""


class Channel:
    """Length-prefixed HandoverMessages over a Unix stream socket, with
    descriptors on a message's first byte; on the event loop, non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    async def send(self, msg: hpb.HandoverMessage, fds: Sequence[int] = ()) -> None:
        body = msg.SerializeToString()
        data = memoryview(_HEADER.pack(len(body)) + body)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while data:
            try:
                sent = self.sock.sendmsg([data], anc)
            except BlockingIOError:
                await fd_ready(self.sock.fileno(), write=True)
                continue
            except OSError as exc:
                raise HandoverError(f"the other process is gone ({exc.strerror})") from None
            data, anc = data[sent:], []  # the descriptors went with the first byte

    async def recv(self, timeout: float) -> tuple[hpb.HandoverMessage, list[int]]:
        """The next message and the descriptors it carried; HandoverError on
        EOF, a timeout, or a message that does not parse."""
        async with asyncio.timeout(timeout):
            fds: list[int] = []
            head = await self._read(_HEADER.size, fds)
            (size,) = _HEADER.unpack(head)
            if size > MAX_MESSAGE:
                _close_all(fds)
                raise HandoverError(f"a message of {size} bytes (the bound is {MAX_MESSAGE})")
            body = await self._read(size, fds)
        msg = hpb.HandoverMessage()
        try:
            msg.ParseFromString(body)
        except Exception as exc:  # protobuf's DecodeError; the bytes are not ours
            _close_all(fds)
            raise HandoverError(f"a message that does not parse: {exc}") from None
        return msg, fds

    async def _read(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        space = socket.CMSG_SPACE(MAX_FDS * 4)
        while len(buf) < n:
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - len(buf), space)
            except BlockingIOError:
                await fd_ready(self.sock.fileno())
                continue
            except OSError as exc:
                raise HandoverError(f"the other process is gone ({exc.strerror})") from None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise HandoverError("descriptors were cut off (over the per-message bound)")
            if not data:
                _close_all(fds)
                raise HandoverError("the other process closed the channel")
            buf += data
        return bytes(buf)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _kind(msg: hpb.HandoverMessage) -> str:
    return msg.WhichOneof("kind") or "nothing"


def _abort(why: str) -> hpb.HandoverMessage:
    return hpb.HandoverMessage(abort=hpb.HandoverAbort(why=why[:500]))


async def _expect(chan: Channel, kind: str, timeout: float) -> tuple[Any, list[int]]:
    msg, fds = await chan.recv(timeout)
    got = _kind(msg)
    if got == kind:
        return getattr(msg, kind), fds
    _close_all(fds)
    if got == "abort":
        raise HandoverError(f"the other process gave up: {msg.abort.why}")
    raise HandoverError(f"expected {kind}, got {got}")


# -- the giver ---------------------------------------------------------------------


class Giver:
    """One handover from this process (``Node.hand_over``): ``run`` returns
    True when everything movable was handed over (this process then stops),
    False when it failed and this process carries on serving."""

    def __init__(
        self,
        plane: DataPlane,
        argv: Sequence[str],
        listeners: Callable[[], tuple[list[socket.socket], socket.socket | None]],
        quiesce: Callable[[], Awaitable[None]],
        revive: Callable[[], Awaitable[None]],
    ) -> None:
        self.plane = plane
        self.argv = list(argv)
        self.listeners = listeners  # the client listeners and the admin's
        self.quiesce = quiesce  # stop serving admin and control here
        self.revive = revive  # serve them again (the handover failed)
        self.proc: asyncio.subprocess.Process | None = None
        self.successor_pid = 0
        self.why = ""  # why it failed
        self._abandoned = asyncio.Event()

    async def run(self, rendezvous: str = "") -> bool:
        """Hand over to a successor started here, or (``rendezvous``, a worker
        of a node of several) to the one that connects to that Unix socket:
        the successor's supervisor starts it."""
        stats = self.plane.handover_stats
        stats.state = "giving"
        started = time.monotonic()
        if rendezvous:
            try:
                ours = await self._rendezvous(rendezvous)
            except HandoverError as exc:
                return self._failed(str(exc))
        else:
            ours, theirs = socket.socketpair()
            try:
                await self._spawn(theirs)
            except OSError as exc:
                ours.close()
                return self._failed(f"the successor could not start: {exc}")
            finally:
                theirs.close()
        chan = Channel(ours)
        stopped = False
        try:
            await self._greet(chan)
            stopped = True
            await self._move_all(chan)
        except HandoverError as exc:
            return await self._recover(chan, str(exc), stopped)
        finally:
            chan.close()
        stats.state = "given"
        stats.last_seconds = time.monotonic() - started
        log.info(
            "handover done: %d marks to %s in %.2fs, %d stay here to drain",
            stats.marks_out,
            f"pid {self.successor_pid}" if self.successor_pid else "the successor",
            stats.last_seconds,
            stats.kept,
        )
        return True

    def abandon(self) -> None:
        """The successor's supervisor says it exited: stop waiting for it."""
        self._abandoned.set()

    async def _rendezvous(self, path: str) -> socket.socket:
        accept = asyncio.ensure_future(accept_taker(path, HELLO_TIMEOUT))
        give_up = asyncio.ensure_future(self._abandoned.wait())
        await asyncio.wait({accept, give_up}, return_when=asyncio.FIRST_COMPLETED)
        give_up.cancel()
        if not accept.done():
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept
            raise HandoverError("the successor node exited before its worker connected")
        return accept.result()

    async def _spawn(self, theirs: socket.socket) -> None:
        env = dict(os.environ)
        env[ENV] = json.dumps({"fd": theirs.fileno()})
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            # It outlives us: its own session, so signals to our group skip it.
            start_new_session=True,
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        self.successor_pid = self.proc.pid
        log.info("handover: started the successor (pid %d): %s", self.proc.pid, " ".join(self.argv))

    async def _greet(self, chan: Channel) -> None:
        """Hello, listeners, listening: after this the successor accepts."""
        hello, fds = await _expect(chan, "hello", HELLO_TIMEOUT)
        _close_all(fds)
        if hello.format != FORMAT:
            await chan.send(_abort(f"format {hello.format} unknown here (this is {FORMAT})"))
            raise HandoverError(f"the successor speaks format {hello.format}, not {FORMAT}")
        log.info("handover: successor pid %d is pmlb %s", hello.pid, hello.version)
        socks, admin = self.listeners()
        msg = hpb.HandoverMessage()
        msg.listeners.addresses.extend(_addr(s) for s in socks)
        msg.listeners.admin = admin is not None
        await chan.send(msg, [s.fileno() for s in socks] + ([admin.fileno()] if admin else []))
        _, fds = await _expect(chan, "listening", STEP_TIMEOUT)
        _close_all(fds)
        # New clients go to the successor from here on; so do admin requests.
        plane = self.plane
        plane.accepting = False
        for acceptor in plane.acceptors:
            acceptor.pause()
        await self.quiesce()

    async def _move_all(self, chan: Channel) -> None:
        plane = self.plane
        stats = plane.handover_stats
        conns, kept = handoff.movable(plane)
        stats.kept = kept
        log.info("handover: %d marks to move, %d stay (TLS, half-closed, ...)", len(conns), kept)
        timeout = plane.config.move_timeout + 1.0
        for batch in handoff.batches(conns):
            if self._abandoned.is_set():  # its supervisor died: it will not last
                raise HandoverError("the successor node exited part-way")
            release = handoff.Release(plane, batch)
            plane.handoff = release
            try:
                release.begin()
                for conn in await release.settle(timeout):
                    stats.kept += 1
                    plane.placement.rebind(conn)  # stays: served (and drained) here
                marks, fds = release.export()
            finally:
                plane.handoff = None
            if not marks:
                continue
            msg = hpb.HandoverMessage()
            msg.marks.marks.extend(marks)
            try:
                await chan.send(msg, fds)
                _, extra = await _expect(chan, "taken", STEP_TIMEOUT)
                _close_all(extra)
            except HandoverError:
                await self._take_back(release, marks, fds)
                raise
            release.let_go()
            _close_all(fds)
        done = hpb.HandoverMessage()
        done.done.moved = stats.marks_out
        done.done.kept = stats.kept
        await chan.send(done)
        for acceptor in plane.acceptors:
            acceptor.close()

    async def _take_back(
        self, release: handoff.Release, marks: list[hpb.HandedMark], fds: list[int]
    ) -> None:
        """The successor did not confirm a batch: nobody else read those
        sockets, so they are ours again, state and all."""
        self._kill()
        for conn in release.ready:
            handoff.let_go(self.plane, conn)
        taken = await handoff.adopt(self.plane, marks, fds)
        self.plane.handover_stats.marks_in -= taken  # not a handover in
        log.warning("handover: took back %d marks the successor had not confirmed", taken)

    async def _recover(self, chan: Channel, why: str, stopped: bool) -> bool:
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(TimeoutError):  # did it exit, and how?
                await asyncio.wait_for(proc.wait(), 1.0)
            if proc.returncode is not None and proc.returncode != -signal.SIGKILL:
                why = f"the successor exited with status {proc.returncode} ({why})"
        self._kill()
        if stopped:
            plane = self.plane
            plane.accepting = True
            for acceptor in plane.acceptors:
                acceptor.resume()
            await self.revive()
        return self._failed(why)

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)

    def _failed(self, why: str) -> bool:
        self.why = why
        stats = self.plane.handover_stats
        stats.state = "failed"
        stats.failed += 1
        stats.last_error = why
        log.error("handover failed, this process carries on serving: %s", why)
        return False


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def handover_socket(rundir: str, index: int) -> str:
    """Where worker ``index`` of a node of several waits for its successor
    (in the node's private run directory, mode 0700)."""
    return os.path.join(rundir, f"handover-{index}.sock")


async def accept_taker(path: str, timeout: float) -> socket.socket:
    """The one connection of this worker's successor on ``path`` (a process
    of this user only), within ``timeout``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(1)
        srv.setblocking(False)
        async with asyncio.timeout(timeout):
            conn, _ = await asyncio.get_running_loop().sock_accept(srv)
    except TimeoutError:
        raise HandoverError(f"no successor connected within {timeout:.0f}s") from None
    except OSError as exc:
        raise HandoverError(f"cannot wait for the successor on {path}: {exc}") from None
    finally:
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        conn.close()
        raise HandoverError(f"a process of uid {uid} connected; only this user's may take over")
    return conn


# -- the taker ---------------------------------------------------------------------


def taker_channel() -> Channel | None:
    """The channel to the predecessor, when this process is a successor: an
    inherited descriptor (``fd``) or a worker's rendezvous socket (``path``)."""
    raw = os.environ.pop(ENV, None)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        if "path" in spec:
            return Channel(_connect(str(spec["path"])))
        sock = socket.socket(fileno=int(spec["fd"]))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise HandoverError(f"${ENV} is not usable: {exc}") from None
    if sock.family != socket.AF_UNIX:
        sock.detach()
        raise HandoverError(f"${ENV} does not name a Unix socket")
    return Channel(sock)


def _connect(path: str) -> socket.socket:
    """Connect to the predecessor worker's rendezvous socket, which it makes
    when its supervisor asks (just before starting ours): retried briefly.
    Runs before the event loop, at start-up, when there is nothing else to do."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Taker:
    """This process's side of a handover, when it is the successor."""

    def __init__(self, chan: Channel, plane: DataPlane, worker: int | None = None) -> None:
        self.chan = chan
        self.plane = plane
        self.worker = worker
        self.started = time.monotonic()

    async def listeners(self) -> tuple[list[socket.socket], socket.socket | None]:
        """Say hello; the predecessor's listening sockets (client, admin).

        Hello waits (up to LINKS_WAIT) for this process's links to be up, so
        that the marks taken over spread over the upstreams as before instead
        of all landing on the first link up."""
        self.plane.handover_stats.state = "taking"
        links = self.plane.links
        deadline = time.monotonic() + LINKS_WAIT
        while any(not lk.is_up for lk in links.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # links come up on their own; a poll, bounded
        hello = hpb.HandoverMessage()
        hello.hello.format = FORMAT
        hello.hello.version = __version__
        hello.hello.pid = os.getpid()
        hello.hello.worker = -1 if self.worker is None else self.worker
        await self.chan.send(hello)
        msg, fds = await _expect(self.chan, "listeners", STEP_TIMEOUT)
        want = len(self.plane.config.listen) + (1 if msg.admin else 0)
        if len(fds) != want or len(msg.addresses) != len(self.plane.config.listen):
            _close_all(fds)
            raise HandoverError(
                f"the predecessor listens on {list(msg.addresses)}; this configuration "
                f"listens on {len(self.plane.config.listen)} addresses"
            )
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(False)
        admin = socks.pop() if msg.admin else None
        return socks, admin

    async def listening(self) -> None:
        await self.chan.send(hpb.HandoverMessage(listening=hpb.HandoverListening()))

    async def refuse(self, why: str) -> None:
        """This process cannot take over: say why (the predecessor carries on)."""
        with contextlib.suppress(HandoverError):
            await self.chan.send(_abort(why))
        self.chan.close()

    async def take_marks(self) -> None:
        """Batches until ``done``; a predecessor that goes away first leaves
        this process with what it took (it says so)."""
        stats = self.plane.handover_stats
        first = 0.0
        wait = self.plane.config.move_timeout + handoff.DRAIN_WAIT + STEP_TIMEOUT
        try:
            while True:
                # A batch comes once its moves are answered (--move-timeout)
                # and its write buffers are flushed (DRAIN_WAIT), or never.
                msg, fds = await self.chan.recv(wait)
                first = first or time.monotonic()
                kind = _kind(msg)
                if kind == "done":
                    _close_all(fds)
                    break
                if kind != "marks" or len(fds) != len(msg.marks.marks):
                    _close_all(fds)
                    raise HandoverError(f"a {kind} message with {len(fds)} descriptors")
                # Ours from now on, before any byte is read from them.
                await self.chan.send(hpb.HandoverMessage(taken=hpb.HandoverTaken(count=len(fds))))
                taken = await handoff.adopt(self.plane, list(msg.marks.marks), fds)
                log.info("handover: took %d marks (%d so far)", taken, stats.marks_in)
        except HandoverError as exc:
            stats.state = "failed"
            stats.last_error = str(exc)
            log.warning("handover cut short (%s): serving the %d marks taken", exc, stats.marks_in)
            return
        finally:
            self.chan.close()
        stats.state = "taken"
        stats.last_seconds = time.monotonic() - self.started
        stats.transfer_seconds = time.monotonic() - first
        log.info(
            "handover done: took %d marks in %.2fs (pause per client: mean %.1f ms, max %.1f ms)",
            stats.marks_in,
            stats.last_seconds,
            stats.describe()["pause_mean_ms"],
            stats.pause_max * 1000,
        )


def successor_argv(raw_argv: Sequence[str]) -> list[str]:
    """The successor's command line: this one, through the same interpreter
    (whatever version of pmlb is installed for it now)."""
    return [sys.executable, "-m", "pmlb", *raw_argv]
