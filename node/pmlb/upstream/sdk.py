"""The Python SDK for writing a pmlb upstream.

An upstream is a handful of handlers::

    class Chat(Handler):
        def on_open(self, conn):            # a mark was bound here
            conn.send(b"welcome")
        def on_message(self, conn, data):   # one client message (or raw read)
            conn.send(conn.mark.encode() + b" " + data)
        def on_close(self, conn, reason):   # the mark is gone
            ...

    server = UpstreamServer(Chat(), upstream_id="u1", listen="127.0.0.1:7001")
    await server.start()

Handlers may be plain functions or coroutines. Handlers of one mark run one
at a time, in frame order; handlers of different marks run concurrently (at
most ``concurrency`` marks at once per node stream), so a slow handler delays
only its own mark. A handler that raises closes only its mark, with reason
``upstream_error`` (logged with its traceback, counted in
``stats["handler_errors"]``); the stream and every other mark carry on.

The SDK implements ``pmlb.v1.Upstream`` and serves ``grpc.health.v1.Health``
(``set_serving`` flips it). It handles the protocol for you: flow control both
ways (``send`` queues, bounded, when the node has no credit for the mark;
credit is granted back to the node only while the mark's outgoing queue is
short, so a client that does not read slows its own sender and nobody else),
acknowledgements riding on replies (and sent on their own for messages that
produce none), answers to the node's pings straight from the reader, and
de-duplication of replayed frames by sequence number. Delivery is
at-least-once across failovers: ``(conn.mark, conn.seq)`` is the idempotency
key (see ``pmlb.upstream.ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc

from pmlb import __version__
from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import (
    BackpressureError,
    ConfigError,
    FrameTooLarge,
    InvalidMark,
    MarkGone,
    MetadataTooLarge,
    PushRefused,
)
from pmlb.protocol import reasons, wire
from pmlb.protocol.domain import is_loopback, parse_hostport
from pmlb.protocol.ids import node_of
from pmlb.transport import (
    DEFAULT_TRANSPORT,
    HEALTH_SERVICE,
    Refused,
    ServerStream,
    ServerTLS,
    check_transport,
)
from pmlb.upstream.tracking import Barriers, MarkInfo, WatchedMarks

if TYPE_CHECKING:
    from pmlb.client import MarkClient

log = logging.getLogger("pmlb.upstream")


class _OneLine(logging.Filter):
    """Every line this SDK logs stays one printable line: text a peer chose
    (a Hello id, a mark, a reason) with a newline or an ESC in it cannot
    forge a log line or drive a terminal (control characters are escaped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.isprintable():
            record.msg = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in msg)
            record.args = None
        return True


log.addFilter(_OneLine())

SERVICE_NAME: Final = HEALTH_SERVICE
DEFAULT_MAX_QUEUE: Final = 4 << 20
DEFAULT_CONCURRENCY: Final = 64
# A Bridge stream that has not sent its Hello by then is ended (DEADLINE_EXCEEDED):
# a peer opening streams and sending nothing must not hold them for ever.
DEFAULT_HELLO_TIMEOUT: Final = 10.0
# Bridge streams held at once (each node worker holds one): far above a real
# cluster's (nodes x workers), low enough that a peer opening streams until
# memory runs out is refused first.
DEFAULT_MAX_STREAMS: Final = 1024


def _owned_by(mark: str, node_id: str) -> bool:
    try:
        return node_of(mark) == node_id
    except InvalidMark:
        return False


class Handler:
    """Override what you need; every handler may be sync or async."""

    def on_open(self, conn: Conn) -> Awaitable[None] | None:
        return None

    def on_message(self, conn: Conn, data: bytes) -> Awaitable[None] | None:
        return None

    def on_mark(self, mark: str, info: MarkInfo | None) -> None:
        """With ``UpstreamServer(watch_marks=True)``: a mark of a node this
        upstream has a link with appeared or changed (``info``), or ended
        (None). Called from the stream's reader: keep it short, never block."""

    def on_close(self, conn: Conn, reason: str) -> Awaitable[None] | None:
        return None


class Conn:
    """One mark, as this upstream sees it while the mark is bound here."""

    __slots__ = (
        "_acked_sent",
        "_busy",
        "_credit",
        "_deferred",
        "_done_seq",
        "_inbox",
        "_owed",
        "_queue",
        "_queued_bytes",
        "_recv_seq",
        "_session",
        "_stamp",
        "accepted_at_unix_ms",
        "client_addr",
        "client_port",
        "closed",
        "framing",
        "last_seq",
        "mark",
        "max_frame",
        "max_meta",
        "metadata",
        "node_id",
        "resumed",
        "seq",
        "service",
        "state",
        "trace_context",
    )

    def __init__(self, session: _Session, mark: str, o: pb.Open) -> None:
        self._session = session
        self.mark = mark
        self.service = o.service
        self.client_addr = o.client_addr
        self.client_port = o.client_port
        self.node_id = o.node_id
        self.metadata: dict[str, str] = dict(o.metadata)
        self.resumed = o.resumed
        self.trace_context: dict[str, str] = dict(o.trace_context)
        self.framing = o.framing
        # The node's limits for this mark (0: an older node did not say).
        self.max_frame = o.max_frame
        self.max_meta = o.max_meta
        self.accepted_at_unix_ms = o.accepted_at_unix_ms
        # ``seq``: the sequence number of the message being handled (in
        # on_message), stable across replays and upstreams: with ``mark`` it
        # is the idempotency key for the handler's effects.
        self.seq = 0
        # ``last_seq``: the highest seq whose handler has started; replies
        # carry it as their acknowledgement. ``_done_seq``: the highest seq
        # whose handler has returned (acknowledged even without a reply).
        # ``_recv_seq``: the highest seq received (replays below it are skipped).
        self.last_seq = self._done_seq = self._recv_seq = max(0, o.next_seq - 1)
        self.closed = False
        self.state: Any = None  # free for the application
        self._credit = session.peer_window
        self._owed = 0
        self._acked_sent = self.last_seq
        # Messages whose handler deferred their acknowledgement (defer()):
        # nothing at or above the lowest is acknowledged until it is done.
        self._deferred: set[int] = set()
        self._queue: deque[tuple[bytes, int]] = deque()
        self._queued_bytes = 0
        self._stamp = 0
        # Work for this mark's handlers, in frame order, while one of them is
        # running (async) or waiting for a concurrency slot; None when idle.
        self._inbox: deque[_Work] | None = None
        self._busy = False

    def send(self, payload: bytes) -> None:
        """Send one message (raw framing: bytes) to the mark's client.

        Never blocks. When the node has no credit left for this mark the
        message waits in a queue bounded by the server's ``max_queue`` (each
        message counts its length plus wire.FRAME_OVERHEAD); past it
        BackpressureError is raised (the client is not reading). A payload
        over the node's ``max_frame`` raises FrameTooLarge: the node would not
        deliver it. Raised inside a handler, either closes only this mark
        (``upstream_error``); catch it to answer otherwise.
        """
        if self.closed:
            raise MarkGone(f"mark {self.mark} is closed")
        if self.max_frame and len(payload) > self.max_frame:
            raise FrameTooLarge(len(payload), self.max_frame)
        # A reply from this mark's own handler acknowledges the message being
        # handled; a send from anywhere else (another mark's handler, a
        # background task) only what this mark's handlers have finished.
        acked = self.last_seq if _handling.get() is self else self._done_seq
        if self._queue or self._credit <= 0:
            cost = len(payload) + wire.FRAME_OVERHEAD
            self._queued_bytes += cost
            if self._queued_bytes > self._session.server.max_queue:
                self._queued_bytes -= cost
                raise BackpressureError(f"mark {self.mark}: outgoing queue full")
            self._queue.append((payload, acked))
            return
        self._emit(payload, acked)

    def _push(self, payload: bytes) -> None:
        """A push to this mark (UpstreamServer.push): written now, not held
        for credit (the node bounds it by the client's write buffer), after
        anything queued before it."""
        if self.closed:
            raise MarkGone(f"mark {self.mark} is closed")
        if self.max_frame and len(payload) > self.max_frame:
            raise FrameTooLarge(len(payload), self.max_frame)
        if self._queue:
            self._flush_queue(force=True)
        self._emit(payload, self.last_seq if _handling.get() is self else self._done_seq)

    def accepted(self) -> asyncio.Future[None]:
        """Done when the node has applied everything this upstream sent on
        the mark's stream so far: replies in the client's write buffer,
        metadata set (and told to upstreams that watch marks), pushes made
        from this mark's handlers accepted. Fails with PushRefused when the
        link ends first, or when the node refused one of this mark's frames.
        On a node older than this SDK, done at once."""
        return self._session.barriers.track(self.mark)

    def defer(self) -> Callable[[], None]:
        """Hold this message's acknowledgement until the returned ``done()``
        is called, even after the handler returns and its replies are sent.

        Call it in ``on_message`` before any reply. Until ``done()``, the node
        keeps the message (and every later one of this mark) for replay: if
        this upstream dies first, the next one receives it again. Use it when
        the message's effect is not safe yet when the handler returns (a
        publish whose fan-out is still being accepted, a write still in
        flight). ``done()`` may be called from anywhere, once."""
        if _handling.get() is not self:
            raise RuntimeError("defer() belongs in this mark's own on_message")
        seq = self.seq
        if seq and self._acked_sent >= seq:
            raise RuntimeError(
                f"mark {self.mark}: seq {seq} was acknowledged already (by a reply): "
                "call defer() before replying"
            )
        self._deferred.add(seq)
        return functools.partial(self._undefer, seq)

    def _undefer(self, seq: int) -> None:
        self._deferred.discard(seq)
        if not self.closed:
            self._settle()

    def _clamp(self, acked: int) -> int:
        """The highest acknowledgement allowed: below every deferred message."""
        return min(acked, min(self._deferred) - 1) if self._deferred else acked

    def _emit(self, payload: bytes, acked: int) -> None:
        acked = self._clamp(acked)
        session = self._session
        self._credit -= len(payload) + session.overhead
        writer = session.writer
        f = writer.frame()
        f.mark = self.mark
        d = f.data
        d.payload = payload
        if acked:
            d.acked = acked
            self._acked_sent = max(self._acked_sent, acked)
        writer.add_payload(len(payload) + wire.FRAME_OVERHEAD)
        writer.kick()

    def close(self, reason: str = reasons.UPSTREAM_CLOSED, detail: str = "") -> None:
        """Close the mark: the node flushes what it has to the client, then closes it."""
        if self.closed:
            return
        self._flush_queue(force=True)
        self._session.send_close(self.mark, reason, detail)
        self._session.forget(self)

    def set_meta(self, values: Mapping[str, str]) -> None:
        """Set metadata on the mark; the node hands it to every later upstream.
        MetadataTooLarge when the mark's metadata would exceed the node's
        ``max_meta`` (the sum of key and value lengths); nothing is changed."""
        if self.max_meta:
            after = {**self.metadata, **values}
            size = sum(len(k) + len(v) for k, v in after.items())
            if size > self.max_meta:
                raise MetadataTooLarge(
                    f"mark {self.mark}: metadata of {size} bytes exceeds the node's "
                    f"limit of {self.max_meta}"
                )
        self.metadata.update(values)
        f = self._session.writer.frame()
        f.mark = self.mark
        f.meta.set.update(values)
        self._session.writer.kick()

    def unset_meta(self, *keys: str) -> None:
        for k in keys:
            self.metadata.pop(k, None)
        f = self._session.writer.frame()
        f.mark = self.mark
        f.meta.unset.extend(keys)
        self._session.writer.kick()

    # -- flow control ---------------------------------------------------------

    def _on_credit(self, credit: int) -> None:
        self._credit += credit
        self._flush_queue()

    def _flush_queue(self, force: bool = False) -> None:
        q = self._queue
        while q and (force or self._credit > 0):
            payload, acked = q.popleft()
            self._queued_bytes -= len(payload) + wire.FRAME_OVERHEAD
            self._emit(payload, acked)

    # -- what its session (the node's stream) does with it ----------------------
    # _Session calls these, never the fields they keep: the mark's delivery
    # bookkeeping (the seq received and handled, credit owed, the handler
    # queue) is the Conn's own.

    def _touch(self, stamp: int) -> bool:
        """First frame of batch ``stamp`` for this mark: settle it after."""
        if self._stamp == stamp:
            return False
        self._stamp = stamp
        return True

    def _fresh(self, seq: int, cost: int) -> bool:
        """Message ``seq`` is new (not a replay of one received since the
        Open); a replayed one is not handled again, but its credit returns."""
        if seq <= self._recv_seq:
            self._owed += cost
            return False
        self._recv_seq = seq
        return True

    def _handled(self, seq: int, cost: int) -> None:
        """The handler of message ``seq`` returned: acknowledge it, owe its credit."""
        self._done_seq = max(self._done_seq, seq)
        self._owed += cost

    def _later(self, work: _Work) -> bool:
        """Queue ``work`` behind the handler running for this mark; False
        when none is (then the caller runs it now)."""
        if not self._busy:
            return False
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(work)
        return True

    def _running(self) -> None:
        """An async handler of this mark is now running (or waiting for a slot)."""
        self._busy = True

    def _next(self) -> _Work | None:
        """The next queued work, None when there is none (or the mark is gone)."""
        inbox = self._inbox
        if not inbox or self.closed:
            return None
        return inbox.popleft()

    def _idle(self) -> None:
        """No handler of this mark runs any more: settle what they did."""
        self._busy = False
        self._settle()

    def _gone(self) -> None:
        """Forgotten by its session: queued work is dropped."""
        self.closed = True
        self._inbox = None

    def _settle(self) -> None:
        """Acknowledge what the handlers finished and return credit for it,
        unless our queue towards the client is long."""
        session = self._session
        if self.closed or self._queued_bytes >= session.peer_window:
            return  # hold the node's credit: this mark's client is not keeping up
        done = self._clamp(self._done_seq)
        ack_due = not self._queue and self._acked_sent < done
        if self._owed >= session.grant_threshold or ack_due:
            f = session.writer.frame()
            f.mark = self.mark
            fl = f.flow
            if self._owed:
                fl.credit = self._owed
                self._owed = 0
            if ack_due:
                fl.acked = done
                self._acked_sent = done
            session.writer.kick()


# The mark whose on_message is running here (its replies acknowledge its message).
_handling: contextvars.ContextVar[Conn | None] = contextvars.ContextVar(
    "pmlb_handling", default=None
)


async def _as_handler(conn: Conn, awaitable: Awaitable[None]) -> None:
    """Run an async on_message as ``conn``'s own handler (see Conn.send)."""
    token = _handling.set(conn)
    try:
        await awaitable
    finally:
        _handling.reset(token)


# One unit of a mark's work: (kind, seq, payload or close reason, credit cost).
_Work = tuple[int, int, Any, int]
_OPEN, _DATA, _CLOSE = 0, 1, 2
_HANDLER_NAMES = ("on_open", "on_message", "on_close")


class _Session:
    """One Bridge stream, from one node.

    Handlers of one mark run one at a time, in frame order; handlers of
    different marks run concurrently (async handlers), at most
    ``server.concurrency`` marks at once on this stream. A sync handler that
    returns runs inline while the batch is read, which is the fast path. The
    reader never waits for a handler: pings are answered at once and frames
    for a busy mark wait in its inbox (bounded by the credit granted to the
    node), so a slow handler delays only its own mark.
    """

    def __init__(
        self,
        server: UpstreamServer,
        node_id: str,
        peer_window: int,
        peer_protocol: int,
        writer: wire.BatchWriter,
        answers_pings: bool = False,
    ) -> None:
        self.server = server
        self.node_id = node_id
        self.peer_window = peer_window
        self.overhead = wire.frame_overhead(peer_protocol)
        self.grant_threshold = max(1, server.window // 2)
        self.writer = writer
        self.conns: dict[str, Conn] = {}
        self.stamp = 0
        self.running = 0  # marks whose handlers run in a task right now
        self.ready: deque[tuple[Conn, Awaitable[None], _Work]] = deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self.barriers = Barriers(self._ping, answers_pings)
        self.ended = False

    def _ping(self, ping_id: int) -> None:
        f = self.writer.frame()
        f.ping.id = ping_id
        self.writer.kick()

    def send_close(self, mark: str, reason: str, detail: str) -> None:
        f = self.writer.frame()
        f.mark = mark
        c = f.close
        c.reason = reason
        if detail:
            c.detail = detail
        self.writer.kick()

    def forget(self, conn: Conn) -> None:
        conn._gone()
        if self.conns.get(conn.mark) is conn:
            del self.conns[conn.mark]
        self.server._release(conn)

    def process(self, batch: pb.Batch) -> None:
        """Apply one batch: frames in order, handlers started (not awaited)."""
        conns = self.conns
        stats = self.server.stats
        overhead = self.overhead
        self.stamp += 1
        stamp = self.stamp
        touched: list[Conn] = []
        for f in batch.frames:
            kind = f.WhichOneof("kind")
            mark = f.mark
            if kind == "data":
                conn = conns.get(mark)
                if conn is None:
                    stats["frames_for_unknown_marks"] += 1
                    continue
                d = f.data
                payload = d.payload
                cost = len(payload) + overhead
                if conn._touch(stamp):
                    touched.append(conn)
                seq = d.seq
                if seq and not conn._fresh(seq, cost):
                    stats["duplicates_skipped"] += 1
                    continue
                self._submit(conn, (_DATA, seq, payload, cost))
            elif kind == "open":
                self._open(mark, f.open)
            elif kind == "flow":
                conn = conns.get(mark)
                if conn is not None and f.flow.credit:
                    conn._on_credit(f.flow.credit)
                    if conn._touch(stamp):
                        touched.append(conn)
            elif kind == "close":
                self._close_frame(mark, f.close.reason)
            elif kind == "ping":
                self._ping_frame(f.ping)
            elif kind == "mark_event":
                self.server.marks.apply(self, self.node_id, mark, f.mark_event)
            elif kind == "refused":
                self._refused(mark, f.refused)
            else:
                stats["unexpected_frames"] += 1
        for conn in touched:
            conn._settle()

    # Frames other than data and flow: rare, so out of the loop above.

    def _open(self, mark: str, o: pb.Open) -> None:
        stats = self.server.stats
        if not _owned_by(mark, self.node_id):
            # A node opens only its own marks: a peer naming another
            # node's mark would take its pushes and closes here.
            stats["foreign_opens"] += 1
            if stats["foreign_opens"] == 1 or not stats["foreign_opens"] % 1000:
                log.warning(
                    "node %s opened %r, a mark of another node; ignored (%d so far)",
                    self.node_id,
                    mark,
                    stats["foreign_opens"],
                )
            return
        old = self.conns.get(mark)
        if old is not None:
            self.forget(old)
        conn = Conn(self, mark, o)
        self.conns[mark] = conn
        self.server._hold(conn)
        self._submit(conn, (_OPEN, 0, None, 0))

    def _close_frame(self, mark: str, reason: str) -> None:
        conn = self.conns.get(mark)
        if conn is None:
            if reason == reasons.UNKNOWN_MARK and self.barriers.gone(mark):
                self.server.stats["pushes_refused"] += 1
            return
        if reason != reasons.UNKNOWN_MARK:
            # Answered once its earlier messages are handled (a "moved"
            # mark gets its replies first, then this close).
            self._submit(conn, (_CLOSE, 0, reason, 0))
        else:  # the node no longer has it: nothing to answer
            self._submit(conn, (_CLOSE, -1, reason, 0))

    def _ping_frame(self, p: pb.Ping) -> None:
        if not p.reply:
            r = self.writer.frame()
            r.ping.id = p.id
            r.ping.reply = True
            self.writer.kick()
        else:
            self.barriers.answered(p.id)

    def _refused(self, mark: str, refusal: pb.Refused) -> None:
        # A frame of ours the node did not apply: a push it does not permit
        # fails that push; anything else is a bug worth a line in the log (we
        # check the node's limits before sending).
        stats = self.server.stats
        stats["refused_by_node"] += 1
        why = reasons.clean(refusal.reason)
        if self.barriers.refuse(mark, PushRefused(why, f"mark {mark}")):
            stats["pushes_refused"] += 1  # the caller's future says so
            return
        log.warning(
            "mark=%s the node refused a frame: %s (%d bytes, limit %d)",
            mark,
            why,
            refusal.size,
            refusal.limit,
        )

    # -- running handlers -------------------------------------------------------

    def _submit(self, conn: Conn, work: _Work) -> None:
        if conn._later(work):
            return
        try:
            result = self._call(conn, work)
        except Exception as exc:
            self._failed(conn, work, exc)
            return
        if result is not None and inspect.isawaitable(result):
            conn._running()
            if self.running < self.server.concurrency:
                self._spawn(conn, result, work)
            else:
                self.ready.append((conn, result, work))
            return
        self._done(conn, work)

    def _call(self, conn: Conn, work: _Work) -> Awaitable[None] | None:
        kind, seq, arg, _ = work
        handler = self.server.handler
        if kind == _DATA:
            if conn.closed:
                return None
            conn.seq = seq
            if seq:
                conn.last_seq = seq
            token = _handling.set(conn)
            try:
                result = handler.on_message(conn, arg)
            finally:
                _handling.reset(token)
            if result is not None and inspect.isawaitable(result):
                return _as_handler(conn, result)
            return result
        if kind == _OPEN:
            return self._traced("pmlb.upstream.open", conn, "", handler.on_open)
        # _CLOSE
        if conn.closed:
            return None
        self.forget(conn)
        return self._traced("pmlb.upstream.close", conn, arg, handler.on_close, arg)

    def _traced(
        self, name: str, conn: Conn, reason: str, fn: Callable[..., Any], *args: Any
    ) -> Awaitable[None] | None:
        """Call ``fn`` inside a span of the mark's trace (for a coroutine
        function: a coroutine that awaits it inside the span)."""
        if inspect.iscoroutinefunction(fn):

            async def spanned() -> None:
                with self.server._span(name, conn, reason):
                    await fn(conn, *args)

            return spanned()
        with self.server._span(name, conn, reason):
            result: Awaitable[None] | None = fn(conn, *args)
            return result

    def _done(self, conn: Conn, work: _Work) -> None:
        kind, seq, _, cost = work
        if kind == _DATA:
            conn._handled(seq, cost)
        elif kind == _CLOSE and seq == 0:
            self.send_close(conn.mark, reasons.UPSTREAM_CLOSED, "close acknowledged")

    def _failed(self, conn: Conn, work: _Work, exc: BaseException) -> None:
        """A handler raised: close this mark alone, with ``upstream_error``."""
        kind = work[0]
        name = _HANDLER_NAMES[kind]
        stats = self.server.stats
        stats["handler_errors"] += 1
        if kind == _CLOSE:  # the mark is already gone; nothing else to close
            log.error("mark=%s %s raised %s", conn.mark, name, type(exc).__name__, exc_info=exc)
            return
        log.error(
            "mark=%s %s raised %s; closing the mark (upstream_error)",
            conn.mark,
            name,
            type(exc).__name__,
            exc_info=exc,
        )
        if conn.closed:
            return
        conn.close(reasons.UPSTREAM_ERROR, f"{name} raised {type(exc).__name__}")
        try:
            result = self.server.handler.on_close(conn, reasons.UPSTREAM_ERROR)
            if result is not None and inspect.isawaitable(result):
                self._track(asyncio.ensure_future(result))
        except Exception:
            stats["handler_errors"] += 1
            log.exception("mark=%s on_close raised", conn.mark)

    def _spawn(self, conn: Conn, first: Awaitable[None], work: _Work) -> None:
        self.running += 1
        self._track(asyncio.ensure_future(self._run_mark(conn, first, work)))

    def _track(self, task: asyncio.Future[None]) -> None:
        assert isinstance(task, asyncio.Task)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("upstream handler task failed", exc_info=task.exception())

    async def _run_mark(self, conn: Conn, first: Awaitable[None], work: _Work) -> None:
        """Finish ``first``, then the mark's inbox in order, then give the slot on."""
        pending: Awaitable[None] | None = first
        try:
            while True:
                try:
                    if pending is not None:
                        await pending
                except Exception as exc:
                    self._failed(conn, work, exc)
                else:
                    self._done(conn, work)
                pending = None
                queued = conn._next()
                if queued is None:
                    break
                work = queued
                try:
                    result = self._call(conn, work)
                except Exception as exc:
                    self._failed(conn, work, exc)
                    continue
                if result is not None and inspect.isawaitable(result):
                    pending = result
        finally:
            conn._idle()
            self.running -= 1
            while self.ready and self.running < self.server.concurrency:
                nxt, coro, w = self.ready.popleft()
                self._spawn(nxt, coro, w)

    async def end(self, reason: str) -> None:
        self.ended = True
        self.barriers.lost(reason)
        self.server.marks.ended(self)
        handler = self.server.handler
        for _, coro, _ in self.ready:
            close = getattr(coro, "close", None)
            if close is not None:
                close()  # never started: do not warn that it was never awaited
        self.ready.clear()
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.conns.values()):
            self.forget(conn)
            try:
                result = handler.on_close(conn, reason)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                self.server.stats["handler_errors"] += 1
                log.exception("mark=%s on_close raised", conn.mark)


# server.stats: what the SDK counted (all start at 0).
STATS: Final = (
    "streams",
    "garbage_batches",
    "frames_for_unknown_marks",
    "duplicates_skipped",
    "unexpected_frames",
    "refused_by_node",
    "pushes_refused",
    "hello_timeouts",
    "handler_errors",
    "unauthenticated",
    "refused_streams",
    "foreign_opens",
)


def _choose_transport(transport: str | None, credentials: grpc.ServerCredentials | None) -> str:
    """Which gRPC implementation serves the Bridge and health (pmlb.transport):
    the argument, else PMLB_LINK_TRANSPORT, else the default. grpcio's own
    ``credentials`` object implies grpcio; ``tls`` works with both."""
    if transport is None:
        transport = "grpcio" if credentials is not None else None
    chosen = check_transport(
        transport or os.environ.get("PMLB_LINK_TRANSPORT") or DEFAULT_TRANSPORT
    )
    if credentials is not None and chosen != "grpcio":
        raise ValueError("credentials= is a grpcio object; use tls=ServerTLS(...) instead")
    return chosen


def _tracing(provider: Any) -> tuple[Any, Any]:
    """A tracer and the W3C propagator: spans for on_open/on_close join the
    mark's trace (Open.trace_context). Without a provider, OpenTelemetry's
    global no-op tracer costs nothing."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return None, None
    provider = provider or trace.get_tracer_provider()
    return provider.get_tracer("pmlb.upstream"), TraceContextTextMapPropagator()


class UpstreamServer:
    """A gRPC server implementing pmlb.v1.Upstream with ``handler``, plus health."""

    def __init__(
        self,
        handler: Handler,
        *,
        upstream_id: str,
        listen: str = "127.0.0.1:0",
        window: int = wire.DEFAULT_WINDOW,
        max_queue: int = DEFAULT_MAX_QUEUE,
        etcd: Sequence[str] = (),
        etcd_prefix: str = "/pmlb",
        tracer_provider: Any = None,
        credentials: grpc.ServerCredentials | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        token: str | None = None,
        tls: ServerTLS | None = None,
        transport: str | None = None,
        watch_marks: bool = False,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        max_streams: int = DEFAULT_MAX_STREAMS,
        allow_anonymous: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.transport = _choose_transport(transport, credentials)
        self._tls = tls
        self.handler = handler
        # Nodes must present this token on the Bridge (the node's
        # --upstream-token); default PMLB_UPSTREAM_TOKEN; None: anyone may call.
        self.token = token if token is not None else os.environ.get("PMLB_UPSTREAM_TOKEN")
        # Marks whose async handlers may run at once on one node's stream.
        self.concurrency = concurrency
        self.upstream_id = upstream_id
        self.listen = listen
        # Streams beyond this many at once are refused (RESOURCE_EXHAUSTED).
        self.max_streams = max_streams
        self._streams_open = 0
        self._last_refusal_log = 0.0
        # Without a token or client certificates, any peer can claim to be any
        # node: only on loopback, unless the operator says so (start()).
        self.allow_anonymous = allow_anonymous
        self.window = window
        self.max_queue = max_queue
        self.port = 0
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        # Node id -> its live streams, oldest first (a dict keeps the order):
        # what is sent to a node by id goes on its oldest live stream, so a
        # later stream claiming the same id does not take it over.
        self._sessions: dict[str, dict[_Session, None]] = {}
        # Every mark of the nodes linked here, when asked (watch_marks).
        self.watch_marks = watch_marks
        self.hello_timeout = hello_timeout
        self.marks = WatchedMarks(handler.on_mark if watch_marks else None)
        self._atomic = 0  # atomic() blocks being run
        self._marks: dict[str, Conn] = {}
        # Reaching marks of nodes we have no link with goes through their
        # control API, found in etcd (only when etcd endpoints are given).
        self._marks_client: MarkClient | None = None
        if etcd:
            # Imported here: the etcd client is a dependency of the node (the
            # "node" extra), not of an upstream that never reaches other nodes.
            from pmlb.client import MarkClient

            self._marks_client = MarkClient(etcd, etcd_prefix)
        self._credentials = credentials  # TLS / mTLS for grpcio (prefer ``tls``)
        self._tracer, self._propagator = _tracing(tracer_provider)
        self._server: Any = None  # a pmlb.transport server, once started

    # -- lifecycle ------------------------------------------------------------

    def _check_anonymous(self) -> None:
        """The rule of the node's admin and control APIs: without credentials,
        loopback only. A Bridge peer is trusted to be the node its Hello names
        (it receives that node's pushes and closes, and opens marks in its
        name); with no token or client certificates, anyone who reaches the
        port is. ``allow_anonymous=True`` accepts that (a private network)."""
        host, _ = parse_hostport(self.listen, "listen")
        verified = bool(self.token) or self._credentials is not None
        verified = verified or bool(self._tls is not None and self._tls.client_ca)
        if verified or self.allow_anonymous or is_loopback(host):
            return
        raise ConfigError(
            f"listen {self.listen} is not a loopback address and nodes need no credentials: "
            "set the nodes' --upstream-token here too (token=, PMLB_UPSTREAM_TOKEN, "
            "--upstream-token) or demand node certificates (tls=ServerTLS(..., client_ca=), "
            "--tls-client-ca), listen on 127.0.0.1, or allow_anonymous=True "
            "(--allow-anonymous) if every peer that can reach it is a node of yours"
        )

    async def start(self) -> int:
        self._check_anonymous()
        # "nghttp2" is native on the node's end only; upstreams serve it with
        # grpclib (the transports are interchangeable on the wire).
        if self.transport in ("grpclib", "nghttp2"):
            from pmlb.transport import h2lib

            server: Any = h2lib.Server(self._bridge, tls=self._tls)
        else:
            from pmlb.transport import cgrpc

            server = cgrpc.Server(self._bridge, tls=self._tls, credentials=self._credentials)
        self.port = await server.start(self.listen)
        self._server = server
        await self.set_serving(True)
        log.info(
            "upstream %s serving pmlb.v1.Upstream on port %d (%s)",
            self.upstream_id,
            self.port,
            self.transport,
        )
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._marks_client is not None:
            await self._marks_client.close_all()
        if self._server is not None:
            await self._server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait()

    async def set_serving(self, serving: bool) -> None:
        """Flip what grpc.health.v1 reports (checkers stop routing to NOT_SERVING)."""
        if self._server is not None:
            await self._server.set_health("", serving)
            await self._server.set_health(SERVICE_NAME, serving)

    def _span(self, name: str, conn: Conn, reason: str = "") -> Any:
        """A span, child of the mark's trace, current while the handler runs."""
        if self._tracer is None:
            return contextlib.nullcontext()
        ctx = self._propagator.extract(conn.trace_context) if conn.trace_context else None
        attributes: dict[str, Any] = {
            "pmlb.mark": conn.mark,
            "pmlb.upstream": self.upstream_id,
            "pmlb.resumed": conn.resumed,
        }
        if reason:
            attributes["pmlb.close_reason"] = reason
        return self._tracer.start_as_current_span(name, context=ctx, attributes=attributes)

    # -- reaching marks -----------------------------------------------------

    def conn(self, mark: str) -> Conn | None:
        """The Conn of a mark bound to this upstream, if any."""
        return self._marks.get(mark)

    def _hold(self, conn: Conn) -> None:
        """A session opened ``conn``: the server reaches it by its mark."""
        self._marks[conn.mark] = conn

    def _release(self, conn: Conn) -> None:
        """Its session forgot ``conn`` (unless a newer Open replaced it)."""
        if self._marks.get(conn.mark) is conn:
            del self._marks[conn.mark]

    def push(self, mark: str, payload: bytes) -> asyncio.Future[None]:
        """Send one message to any mark in the cluster; the returned future is
        done when the node has accepted it (it is in the client's write
        buffer), or fails: MarkGone (not open), PushRefused (the node did
        not permit it, or the link ended before the node confirmed it).

        The message is on its way when push returns: awaiting is only for
        knowing it was accepted, so many pushes can be awaited together
        (``asyncio.gather``), confirmed by one round trip per node. A push is
        not held for credit: the node bounds it by the client's write buffer
        (a client that does not read is closed, write_overflow).

        A mark bound here, or owned by a node this upstream has a link with,
        is reached over that link; any other through its node's control API
        (needs ``etcd``; accepted when the call returns). Pushes to marks
        bound to other upstreams need the node's ``--push-upstreams``.
        """
        loop = asyncio.get_running_loop()
        try:
            conn = self._marks.get(mark)
            if conn is not None and not self._reroute(conn):
                conn._push(payload)
                return conn._session.barriers.track(mark)
            session = self._session_for(mark)
            if session is not None:
                writer = session.writer
                size = len(payload) + wire.FRAME_OVERHEAD
                if writer._held and writer.open_bytes + size > wire.MAX_ATOMIC_BYTES:
                    raise BackpressureError(
                        f"more than {wire.MAX_ATOMIC_BYTES} bytes pushed in one atomic()"
                    )
                f = writer.frame()
                f.mark = mark
                f.data.payload = payload
                writer.add_payload(size)
                writer.kick()
                return session.barriers.track(mark)
            return asyncio.ensure_future(self._control(mark).send(mark, payload))
        except Exception as exc:
            failed: asyncio.Future[None] = loop.create_future()
            failed.set_exception(exc)
            return failed

    def _reroute(self, conn: Conn) -> bool:
        """Inside atomic(), a push to a mark bound here over another stream
        of the same node (another worker's link) goes on the handler's own
        stream instead, so that it lands in the same Batch (the node forwards
        it to the worker holding the mark)."""
        if not self._atomic:
            return False
        handling = _handling.get()
        if handling is None or handling.closed:
            return False
        own = handling._session
        return own is not conn._session and own.node_id == conn._session.node_id

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Frames made inside (pushes, sends, metadata; no await inside) reach
        each node in one Batch, which the node applies whole or not at all:
        if this process dies, a node has either all of them or none. At most
        wire.MAX_ATOMIC_BYTES per node. Use it with a marker in the sender's
        metadata to make a fan-out happen once (README, "Reaching other marks")."""
        held = [(s.writer, s.writer.hold()) for ss in self._sessions.values() for s in ss]
        self._atomic += 1
        try:
            yield
        finally:
            self._atomic -= 1
            for writer, token in held:
                writer.release(token)

    async def marks_synced(self, streams: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``streams`` node streams (one per node, or per worker of
        a node) have sent their whole list of marks (``watch_marks``)."""
        if not self.watch_marks:
            raise RuntimeError("marks_synced() needs UpstreamServer(watch_marks=True)")
        await self.marks.synced(streams, timeout)

    async def close_mark(self, mark: str, reason: str = reasons.UPSTREAM_CLOSED) -> None:
        """Close any mark in the cluster (same routes as ``push``)."""
        conn = self._marks.get(mark)
        if conn is not None:
            conn.close(reason)
            return
        session = self._session_for(mark)
        if session is not None:
            session.send_close(mark, reason, "")
            return
        await self._control(mark).close(mark, reason)

    def _session_for(self, mark: str) -> _Session | None:
        """A live stream to the node owning ``mark``: the one of the mark
        being handled, when it is to the same node, so that what a handler
        sends goes in order (and in one atomic() Batch) with its replies."""
        node = node_of(mark)
        handling = _handling.get()
        if handling is not None and not handling.closed:
            own = handling._session
            if own.node_id == node and not own.ended:
                return own
        for session in self._sessions.get(node, ()):
            if not session.ended:
                return session
        return None

    def _control(self, mark: str) -> MarkClient:
        if self._marks_client is None:
            raise MarkGone(f"no link to the node owning {mark}, and no etcd to find it")
        return self._marks_client

    # -- the Bridge stream ---------------------------------------------------

    async def _bridge(self, stream: ServerStream) -> None:
        if self._streams_open >= self.max_streams:
            self.stats["refused_streams"] += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= 1.0:  # a flood makes one line a second
                self._last_refusal_log = now
                log.warning(
                    "refused a Bridge stream from %s: %d open, the most (max_streams); "
                    "%d refused so far",
                    stream.peer,
                    self._streams_open,
                    self.stats["refused_streams"],
                )
            raise Refused("RESOURCE_EXHAUSTED", "too many Bridge streams")
        self._streams_open += 1
        try:
            await self._bridge_stream(stream)
        finally:
            self._streams_open -= 1

    async def _bridge_stream(self, stream: ServerStream) -> None:
        if self.token:
            given = stream.metadata.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                self.stats["unauthenticated"] += 1
                log.warning(
                    "refused a Bridge stream without the upstream token from %s", stream.peer
                )
                raise Refused("UNAUTHENTICATED", "upstream token required")
        try:
            first = await asyncio.wait_for(stream.read(), self.hello_timeout)
        except wire.StreamEnded:
            return
        except TimeoutError:
            self.stats["hello_timeouts"] += 1
            log.warning(
                "ended a Bridge stream from %s that sent no Hello within %.1fs (%d so far)",
                stream.peer,
                self.hello_timeout,
                self.stats["hello_timeouts"],
            )
            raise Refused("DEADLINE_EXCEEDED", "no Hello in time") from None
        if first is None or not first.HasField("hello"):
            raise Refused("INVALID_ARGUMENT", "first Batch must carry hello")
        hello = first.hello
        writer = wire.BatchWriter(stream.write)
        reply = writer.current.hello
        reply.id = self.upstream_id
        reply.protocol = wire.PROTOCOL_VERSION
        reply.initial_window = self.window
        reply.software = f"pmlb-upstream-python/{__version__}"
        reply.watch_marks = self.watch_marks
        session = _Session(
            self,
            hello.id,
            hello.initial_window or wire.DEFAULT_WINDOW,
            min(hello.protocol, wire.PROTOCOL_VERSION),
            writer,
            hello.answers_pings,
        )
        self.stats["streams"] += 1
        self._sessions.setdefault(hello.id, {})[session] = None
        writer.start()
        writer.kick()
        log.info("node %s connected (protocol %d, %s)", hello.id, hello.protocol, hello.software)
        reason = "node_lost"
        try:
            session.process(first)
            while True:
                try:
                    batch = await stream.read()
                except wire.StreamEnded:
                    reason = "node_closed"
                    break
                if batch is None:
                    self.stats["garbage_batches"] += 1
                    log.warning("node %s sent a batch that is not a pmlb.v1.Batch", hello.id)
                    continue
                session.process(batch)
        finally:
            peers = self._sessions.get(hello.id, {})
            peers.pop(session, None)
            if not peers:  # ids of nodes gone are not kept
                self._sessions.pop(hello.id, None)
            log.info(
                "node %s stream ended (%s); %d marks released", hello.id, reason, len(session.conns)
            )
            await session.end(reason)
            await writer.close(1.0)
