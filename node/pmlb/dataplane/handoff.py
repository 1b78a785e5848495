"""Live handover, the data plane's half: which client connections can move to
the node's successor process, what a connection's state is on the way
(``pb.HandedMark``), how the giving process lets go of a batch of them, and
how the taking process adopts it. The process-to-process protocol (spawning
the successor, the socket pair, the order of the messages) is
``pmlb.node.handover``.

Letting go of a connection, in the giver:

1. reading stops (the client's bytes wait in the kernel's socket buffer);
2. a bound mark is moved off its upstream as a drain moves it (Close
   "moved"; the upstream answers what it has, then closes the mark), so
   everything the upstream sent for it is written to the client here;
3. the socket's write buffer empties (bounded by ``DRAIN_WAIT``);
4. its state is exported and its socket duplicated; the connection is
   forgotten here without a close towards client or upstream.

The taker then owns the socket and the state, and resumes the mark as after
a failover: an Open with ``resumed`` and the unacknowledged messages
replayed with their sequence numbers. What cannot move stays and is drained
as before: TLS connections (their session keys live in this process), a
connection still inside its PROXY header or TLS handshake, one half-closed by
its client, and one whose framing plugin cannot hand over a partial message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from pmlb._proto.pmlb.v1 import handover_pb2 as hpb
from pmlb.dataplane.conn import ClientConn
from pmlb.dataplane.mark import BOUND, WAITING
from pmlb.errors import FrameTooLarge, FramingError
from pmlb.protocol.wire import FRAME_OVERHEAD

if TYPE_CHECKING:
    from pmlb.dataplane.plane import DataPlane

log = logging.getLogger("pmlb.handover")

# One batch is one message with one descriptor per connection: at most
# SCM_MAX_FD (253) descriptors ride on one message, and a batch's state
# (replay buffers) is bounded too.
BATCH_MARKS: Final = 200
BATCH_BYTES: Final = 16 << 20
# How long a batch's connections may take to flush what was written to them.
DRAIN_WAIT: Final = 1.0
DRAIN_POLL: Final = 0.005
HANDED_OVER: Final = "handed_over"  # the span's close reason in the giver


def why_not_movable(conn: ClientConn, tls: bool) -> str:
    """ "" when ``conn`` can be handed over, else why it stays here."""
    if tls:
        return "TLS (the session keys cannot leave this process)"
    if conn.transport is None or conn.proxy_buf is not None:
        return "inside its PROXY header"
    if conn.core.state not in (WAITING, BOUND):
        return "half-closed, moving or closing"
    if conn.decoder.pending and not hasattr(conn.decoder, "buffered"):
        return "its framing holds a partial message it cannot hand over"
    return ""


def movable(plane: DataPlane) -> tuple[list[ClientConn], int]:
    """The connections to hand over, and how many stay."""
    out, kept = [], 0
    tls = plane.tls is not None
    for conn in plane.marks.values():
        if why_not_movable(conn, tls):
            kept += 1
        else:
            out.append(conn)
    return out, kept


def batches(conns: list[ClientConn]) -> Iterable[list[ClientConn]]:
    """``conns`` in batches of at most BATCH_MARKS (and about BATCH_BYTES)."""
    batch: list[ClientConn] = []
    size = 0
    for conn in conns:
        batch.append(conn)
        size += conn.core.replay_bytes + 256
        if len(batch) >= BATCH_MARKS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Release:
    """The giver's side of one batch: stop, move off the upstreams, flush,
    export. The plane hands ``claim`` every connection it would rebind
    while a release is on (a finished move, a link lost mid-move)."""

    def __init__(self, plane: DataPlane, conns: list[ClientConn]) -> None:
        self.plane = plane
        self.pending = set(conns)
        self.ready: list[ClientConn] = []
        self.paused_at: dict[ClientConn, float] = {}
        self._all_ready = asyncio.Event()

    def begin(self) -> None:
        now = time.monotonic()
        for conn in list(self.pending):
            self.paused_at[conn] = now
            if conn.core.state == BOUND:
                conn.start_move("node handover")  # answered: plane.rebind -> claim
            else:
                self.plane.unwait(conn)
                conn.pause_for_handover()
                self.claim(conn)
        if not self.pending:
            self._all_ready.set()

    def claim(self, conn: ClientConn) -> bool:
        """Whether ``conn`` is this batch's (ready to go: unbound, detached)."""
        if conn not in self.pending:
            return False
        self.pending.discard(conn)
        self.ready.append(conn)
        if not self.pending:
            self._all_ready.set()
        return True

    async def settle(self, timeout: float) -> list[ClientConn]:
        """Wait for the moves (bounded), then for the write buffers to empty;
        returns the connections that did not make it, rebound here."""
        with contextlib.suppress(TimeoutError):  # the move timer ends each move first
            await asyncio.wait_for(self._all_ready.wait(), timeout)
        # A transport says nothing when its buffer empties (only below its
        # low-water mark after a pause): a poll, bounded by DRAIN_WAIT.
        deadline = time.monotonic() + DRAIN_WAIT
        while any(_buffered(c) for c in self.ready) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        stay = [c for c in self.ready if _buffered(c) or c.transport is None]
        stay_set = set(stay)
        self.ready = [c for c in self.ready if c not in stay_set]
        stay += list(self.pending)
        self.pending.clear()
        return stay

    def export(self) -> tuple[list[hpb.HandedMark], list[int]]:
        """The ready connections' state and a duplicate of each socket."""
        marks, fds = [], []
        tracer = self.plane.tracer
        for conn in self.ready:
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            fds.append(os.dup(sock.fileno()))
            marks.append(export(conn, tracer.carrier(conn.span), self.paused_at[conn]))
        return marks, fds

    def let_go(self) -> None:
        """The taker has them: forget them here, no close sent either way."""
        for conn in self.ready:
            let_go(self.plane, conn)
        self.plane.handover_stats.marks_out += len(self.ready)


def _buffered(conn: ClientConn) -> bool:
    t = conn.transport
    return t is not None and t.get_write_buffer_size() > 0


def export(conn: ClientConn, trace: dict[str, str], paused_at: float) -> hpb.HandedMark:
    core = conn.core
    m = hpb.HandedMark(
        mark=conn.mark,
        client_addr=conn.client_addr,
        client_port=conn.client_port,
        accepted_at_unix_ms=conn.accepted_ms,
        seq=core.seq,
        parked=core.parked or (),
        parked_eof=core.parked_eof,
        early=conn.early or (),
        metadata=conn.meta or {},
        binds=core.binds,
        strikes=core.strikes,
        strike_seq=core.strike_seq,
        bytes_in=conn.bytes_in,
        bytes_out=conn.bytes_out,
        frames_in=conn.frames_in,
        frames_out=conn.frames_out,
        trace_context=trace,
        paused_at=paused_at,
    )
    for seq, payload in core.replay or ():
        m.unacked.add(seq=seq, payload=payload)
    buffered = getattr(conn.decoder, "buffered", None)
    if buffered is not None:
        m.partial = buffered()
    return m


def let_go(plane: DataPlane, conn: ClientConn) -> None:
    """Forget ``conn`` as handed over: out of the plane's books, its span
    ended, its socket closed here (the taker holds its own descriptor)."""
    if plane.marks.pop(conn.mark, None) is not None:
        plane.stats.open -= 1
        plane.publish_open()
        if plane.watch.watchers:
            plane.watch.closed(conn)
        plane.uncount_client(conn.client_addr)
    if conn.span is not None:
        plane.tracer.child(conn.span, "pmlb.handover", {"pmlb.mark": conn.mark})
        conn.close_reason = HANDED_OVER
        plane.tracer.end(conn, [conn.upstream_id] if conn.upstream_id else [])
        conn.span = None
    conn.handed_off()


class AdoptedConn(ClientConn):
    """A connection the previous process handed over: its state is restored
    when its transport is made, before the first read can arrive."""

    __slots__ = ("handed",)

    def __init__(self, plane: DataPlane, handed: hpb.HandedMark) -> None:
        super().__init__(plane)
        self.handed: hpb.HandedMark | None = handed

    def connection_made(self, transport: Any) -> None:
        m = self.handed
        assert m is not None
        self.handed = None
        self.transport = transport
        transport.set_write_buffer_limits(high=self.plane.config.client_buffer)
        try:
            restore(self, m)
        except (FrameTooLarge, FramingError) as exc:
            # Its partial message breaks this process's framing (a smaller
            # --max-frame, another framing): that client alone is closed.
            self.plane.stats.framing_errors += 1
            log.warning("mark=%s handed over with input this node refuses: %s", m.mark, exc)
            transport.abort()
            self.transport = None


def restore(conn: ClientConn, m: hpb.HandedMark) -> None:
    """Give ``conn`` (new, unbound) the state ``m`` describes."""
    conn.mark = m.mark
    conn.client_addr, conn.client_port = m.client_addr, m.client_port
    conn.accepted_ms = m.accepted_at_unix_ms
    conn.last_active = time.monotonic()
    conn.meta = dict(m.metadata) or None
    conn.bytes_in, conn.bytes_out = m.bytes_in, m.bytes_out
    conn.frames_in, conn.frames_out = m.frames_in, m.frames_out
    core = conn.core
    core.seq = m.seq
    core.binds = m.binds
    core.strikes, core.strike_seq = m.strikes, m.strike_seq
    if m.unacked:
        core.replay = deque((f.seq, f.payload) for f in m.unacked)
        core.replay_bytes = sum(len(f.payload) + FRAME_OVERHEAD for f in m.unacked)
    parked = list(m.parked)
    if m.partial:
        # The framing's buffer: an incomplete message completes none, but a
        # newer framing may split differently: whatever completes is parked.
        parked += conn.decoder.feed(m.partial)
    core.parked = parked or None
    core.parked_eof = m.parked_eof
    conn.early = list(m.early) or None


def _factory(plane: DataPlane, m: hpb.HandedMark) -> Callable[[], AdoptedConn]:
    return lambda: AdoptedConn(plane, m)


async def adopt(plane: DataPlane, marks: list[hpb.HandedMark], fds: list[int]) -> int:
    """Take over a batch the previous process let go of: each socket gets a
    transport, its mark its state, and it resumes on an upstream here as
    after a failover (or waits for one, as a new mark would). How many."""
    loop = asyncio.get_running_loop()
    tracer, stats = plane.tracer, plane.handover_stats
    taken = 0
    for m, fd in zip(marks, fds, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        try:
            transport, conn = await loop.connect_accepted_socket(_factory(plane, m), sock)
        except OSError as exc:  # the client left while in transit
            log.info("mark=%s handed over closed in transit: %s", m.mark, exc)
            sock.close()
            continue
        assert isinstance(conn, AdoptedConn)
        if conn.transport is None:  # refused in connection_made (logged)
            continue
        # Read again once bound (ClientConn.bind resumes a paused reader):
        # parked and early messages go first, in order.
        transport.pause_reading()
        conn.read_paused = True
        plane.adopt(conn)
        if tracer.enabled:
            conn.span = tracer.resume(conn, dict(m.trace_context))
        if conn.core.binds:
            plane.placement.rebind(conn)
        else:
            plane.placement.place_new(conn)
        pause = max(0.0, time.monotonic() - m.paused_at)
        stats.pause.observe(pause)
        stats.pause_max = max(stats.pause_max, pause)
        taken += 1
    stats.marks_in += taken
    return taken
