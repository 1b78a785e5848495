"""A link: the gRPC channel and Bridge stream between this node and one upstream.

One Link object lives as long as its upstream is configured; it reconnects
with jittered exponential backoff (``aio.Backoff``) whenever the stream ends. While
connected, frames of all the marks bound to it ride one Bridge stream in
batches (wire.BatchWriter) and received batches are dispatched to marks by
mark string, so an upstream can also reach marks bound elsewhere (push).

A link is *up* once the upstream has answered with its Hello. When the stream
breaks, every mark bound to it is handed to the plane (``on_link_lost``) and
the link is excluded from routing until it is up again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from pmlb import __version__
from pmlb.aio import Backoff
from pmlb.dataplane.mark import Mark
from pmlb.dataplane.replies import Replies
from pmlb.dataplane.watch import Watched
from pmlb.errors import PmlbError
from pmlb.protocol import reasons, wire
from pmlb.protocol.domain import UpstreamSpec
from pmlb.transport import ClientStream, TransportError, open_client

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
    from pmlb.config import NodeConfig
    from pmlb.dataplane.siblings import Siblings
    from pmlb.dataplane.watch import MarkWatch
    from pmlb.observability.stats import NodeStats
    from pmlb.transport import ClientTLS

log = logging.getLogger("pmlb.link")

HELLO_TIMEOUT: Final = 5.0
# Reconnect backoff: 50 ms doubling (jittered) up to 5 s; it starts over once
# a session has stayed up this long, so a link that ran for an hour reconnects
# at once after one failure while a flapping upstream is not hammered.
BACKOFF_INITIAL: Final = 0.05
BACKOFF_MAX: Final = 5.0
BACKOFF_RESET_AFTER: Final = 1.0
DOWN, CONNECTING, UP = "down", "connecting", "up"


class LinkBroken(PmlbError):
    """The Bridge stream ended or could not be established."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What a link reads of the node's configuration: a slice of it, as
    MarkLimits is the marks'. The plane makes a new one when SIGHUP changes
    one of these (--ack-timeout, --link-buffer, --push-upstreams are live)."""

    node_id: str
    service: str
    window: int  # --window: the credit we grant the upstream per mark
    transport: str  # --link-transport
    token: str | None = field(repr=False)  # --upstream-token, never logged
    ack_timeout: float  # --ack-timeout: the hung-peer watchdog
    link_buffer: int  # --link-buffer: queued on the link before clients pause
    push_upstreams: tuple[str, ...]

    @classmethod
    def of(cls, config: NodeConfig) -> LinkSettings:
        return cls(
            config.node_id,
            config.service,
            config.window,
            config.link_transport,
            config.upstream_token,
            config.ack_timeout,
            config.link_buffer,
            config.push_upstreams,
        )


# What a link needs of the connections of its marks (dataplane.conn.ClientConn)
# and of its data plane (dataplane.plane.DataPlane), declared here so that
# neither module is imported by this one.
class Conn(Watched, Protocol):
    @property
    def core(self) -> Mark[Any]:
        """The mark's I/O-free state (read per frame: its bound route)."""

    def is_stale(self, route: Any) -> bool: ...
    def deliver(self, payload: bytes, acked: int, link: Any) -> None: ...
    def on_flow(self, credit: int, acked: int, link: Any) -> None: ...
    def on_meta(self, meta: pb.Meta, max_bytes: int) -> int: ...
    def upstream_close(self, reason: str, detail: str, link: Any) -> None: ...
    def resume_if_unblocked(self) -> None: ...


C = TypeVar("C", bound=Conn)


class Plane(Protocol[C]):
    @property
    def link_settings(self) -> LinkSettings: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def watch(self) -> MarkWatch: ...
    @property
    def marks(self) -> Mapping[str, C]: ...
    @property
    def siblings(self) -> Siblings | None: ...
    @property
    def link_tls(self) -> ClientTLS | None: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def max_meta(self) -> int: ...

    def link_up(self, link: Link[C]) -> None: ...
    def link_down(self, link: Link[C]) -> None: ...
    def probation_left(self, link: Link[C], conn: C) -> None:
        """``conn`` left ``link``: if it was on probation there, that ends."""

    def probation_broke(self, link: Link[C]) -> None:
        """``link``'s session ended: a probation on it ends (dataplane.probation)."""


class Link(Generic[C]):
    def __init__(self, spec: UpstreamSpec, plane: Plane[C]) -> None:
        self.spec = spec
        self.plane = plane
        self.state = DOWN
        self.marks: dict[str, C] = {}
        self.stalled: set[C] = set()
        self.congested = False
        # The upstream asked for MarkEvents (Hello.watch_marks); stale: events
        # were skipped while congested, a new snapshot is due on drain.
        self.watch_marks = False
        self.watch_stale = False
        # Refusals, closes for unknown marks and ping answers (dataplane.replies).
        self.replies = Replies(self, plane.stats)
        self.peer_window = wire.DEFAULT_WINDOW
        # Per-frame credit charge agreed with the upstream (wire.frame_overhead)
        # and whether it answers pings (protocol 2).
        self.overhead = wire.FRAME_OVERHEAD
        self.pings = True
        self.retired = False
        self.writer = wire.BatchWriter(self._no_stream)
        self.connects = 0
        self.last_error = ""
        self.up_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stream: ClientStream | None = None
        self._stopping = False
        self._ping_id = 0
        self.last_received = 0.0
        # When we first sent something the upstream has not answered yet (0: all
        # answered). An upstream that stays silent past --ack-timeout is hung.
        self.expect_since = 0.0
        self._hung = False
        # Totals of writers of earlier sessions (each session has a new writer).
        self.batches_sent = 0
        self.frames_sent = 0
        self.full_flushes = 0
        self.failed_over = 0

    # -- what the balancer sees -----------------------------------------------

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def weight(self) -> int:
        return max(1, self.spec.weight)

    @property
    def load(self) -> int:
        return len(self.marks)

    @property
    def is_up(self) -> bool:
        return self.state == UP

    @property
    def stopped(self) -> bool:
        """Stopping or stopped: it will not reconnect."""
        return self._stopping

    @property
    def routable(self) -> bool:
        return self.state == UP and not self.retired and not self.spec.drain

    # -- marks ------------------------------------------------------------------

    def attach(self, conn: C) -> None:
        self.marks[conn.mark] = conn

    def detach(self, conn: C) -> None:
        self.marks.pop(conn.mark, None)
        self.stalled.discard(conn)
        self.plane.probation_left(self, conn)
        if self.retired and not self.marks:
            self.stop()

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"link-{self.id}")

    def stop(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def close(self, timeout: float) -> None:
        """Flush pending frames, end the stream politely, and stop."""
        self._stopping = True
        if self.state == UP:
            await self.writer.close(timeout)
            stream = self._stream
            if stream is not None:
                try:
                    await asyncio.wait_for(stream.done_writing(), timeout)
                except Exception as exc:
                    log.debug("link %s: done_writing failed: %r", self.id, exc)
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, timeout)
            except (asyncio.CancelledError, TimeoutError):
                pass
            except Exception:
                log.exception("link %s ended with an error", self.id)

    async def _run(self) -> None:
        # Consecutive sessions that failed or were up too briefly.
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        while not self._stopping:
            self.up_since = 0.0
            try:
                await self._session()
                error = "session ended"  # pragma: no cover - sessions end by raising
            except LinkBroken as exc:
                error = str(exc)
            if self._stopping:
                return
            backoff.reset_if_up(self.up_since, BACKOFF_RESET_AFTER)
            delay = backoff.next()
            log.log(
                logging.INFO if backoff.failures <= 1 else logging.DEBUG,
                "link %s (%s) down: %s; retry %d in %.2fs",
                self.id,
                self.spec.addr,
                error,
                backoff.failures,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One Bridge stream, from the Hello to its end (LinkBroken, always)."""
        self.state = CONNECTING
        cfg = self.plane.link_settings
        token = cfg.token
        stream = open_client(
            cfg.transport,
            self.spec.addr,
            tls=self.plane.link_tls,
            metadata={"authorization": f"Bearer {token}"} if token else {},
        )
        self._stream = stream
        writer = self._say_hello(stream)
        watchdog: asyncio.Task[None] | None = None
        try:
            first = self._hello_answered(await asyncio.wait_for(stream.read(), HELLO_TIMEOUT))
            watchdog = asyncio.get_running_loop().create_task(self._watchdog(stream))
            self.plane.link_up(self)
            self._dispatch(first)
            while True:
                batch = await stream.read()
                if batch is None:
                    self.plane.stats.garbage_batches += 1
                    log.warning("link %s: dropped a batch that is not a pmlb.v1.Batch", self.id)
                    continue
                self._dispatch(batch)
        except wire.StreamEnded:
            self.last_error = "upstream ended the stream"
            raise LinkBroken(self.last_error) from None
        except TransportError as exc:
            self.last_error = (
                f"no answer within {cfg.ack_timeout:.1f}s (hung)" if self._hung else str(exc)
            )
            raise LinkBroken(self.last_error) from None
        except TimeoutError:
            self.last_error = f"no Hello within {HELLO_TIMEOUT:.0f}s"
            raise LinkBroken(self.last_error) from None
        except LinkBroken as exc:
            self.last_error = str(exc)
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            await self._session_ended(stream, writer)

    def _say_hello(self, stream: ClientStream) -> wire.BatchWriter:
        """A new writer for ``stream``, its first batch our Hello."""
        cfg = self.plane.link_settings
        writer = wire.BatchWriter(stream.write, on_drain=self._on_drain)
        self.writer = writer
        hello = writer.current.hello
        hello.id = cfg.node_id
        hello.protocol = wire.PROTOCOL_VERSION
        hello.initial_window = cfg.window
        hello.service = cfg.service
        hello.software = f"pmlb/{__version__}"
        hello.answers_pings = True
        writer_task = writer.start()
        # A write that fails ends the session: the read that waits fails at once.
        writer_task.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() is None else stream.cancel()
        )
        writer.kick()
        return writer

    def _hello_answered(self, first: pb.Batch | None) -> pb.Batch:
        """The upstream's first batch must carry its Hello: the link is up."""
        if first is None or not first.HasField("hello"):
            raise LinkBroken("upstream did not answer with a Hello")
        self.peer_window = first.hello.initial_window or wire.DEFAULT_WINDOW
        protocol = min(first.hello.protocol, wire.PROTOCOL_VERSION)
        self.overhead = wire.frame_overhead(protocol)
        self.pings = protocol >= 2
        self.watch_marks = first.hello.watch_marks
        self.state = UP
        self.up_since = time.monotonic()
        self.connects += 1
        log.info(
            "link %s (%s) up: upstream says %r, protocol %d, window %d",
            self.id,
            self.spec.addr,
            first.hello.id,
            first.hello.protocol,
            self.peer_window,
        )
        self._hung = False
        self.expect_since = 0.0
        return first

    async def _session_ended(self, stream: ClientStream, writer: wire.BatchWriter) -> None:
        was_up = self.state == UP
        self.state = DOWN
        writer.cancel()
        self.batches_sent += writer.batches_sent
        self.frames_sent += writer.frames_sent
        self.full_flushes += writer.cuts
        self.writer = wire.BatchWriter(self._no_stream)
        await stream.close()
        self._stream = None
        self.congested = False
        self.stalled.clear()
        self.plane.probation_broke(self)
        if was_up and self._stopping:
            log.info("link %s (%s) closed", self.id, self.spec.addr)
        elif was_up:
            self.plane.stats.link_breaks += 1
            log.warning(
                "link %s (%s) lost: %s; %d marks affected",
                self.id,
                self.spec.addr,
                self.last_error or "stopped",
                len(self.marks),
            )
            self.plane.link_down(self)

    async def _watchdog(self, stream: ClientStream) -> None:
        """Break the link when the upstream stops answering (alive TCP, no progress).

        ``expect_since`` is when we first sent something not answered since:
        any batch from the upstream clears it. While marks are bound and the
        link has been quiet for a quarter of --ack-timeout, a Ping goes out;
        the SDK answers it from its reader, never behind a handler, so a slow
        handler keeps its link alive and only a hung process (or a dead path)
        leaves it unanswered for the whole --ack-timeout.
        """
        timeout = self.plane.link_settings.ack_timeout
        period = timeout / 4
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if self.pings and self.marks and now - self.last_received >= period:
                self._ping_id += 1
                f = self.writer.frame()
                f.ping.id = self._ping_id
                self.writer.kick()
                self.plane.stats.pings += 1
                if not self.expect_since:
                    self.expect_since = now
            since = self.expect_since
            # Asked every period, outstanding data or not: its clock counts
            # the bytes of one period (see pmlb.transport.ClientStream).
            moving = stream.last_data()
            # Hung: nothing answered for --ack-timeout and no bytes moving
            # either (a slow link may take seconds to carry one large Batch).
            if since and now - max(since, moving) > timeout:
                self._hung = True
                log.warning(
                    "link %s (%s): nothing received for %.1fs with data outstanding; "
                    "treating the upstream as hung (%s)",
                    self.id,
                    self.spec.addr,
                    timeout,
                    getattr(stream, "tcp_state", lambda: "")(),
                )
                stream.cancel()
                return

    async def _no_stream(self, batch: pb.Batch) -> None:
        raise LinkBroken("link is not connected")

    # -- data ---------------------------------------------------------------------

    def _on_drain(self) -> None:
        """The writer caught up: lift link-level backpressure."""
        if self.congested and self.writer.pending_bytes < self.plane.link_settings.link_buffer // 2:
            self.congested = False
            stalled, self.stalled = self.stalled, set()
            for conn in stalled:
                conn.resume_if_unblocked()
        if self.watch_stale and not self.congested and self in self.plane.watch.watchers:
            self.plane.watch.snapshot(self, self.plane.marks.values())

    def check_congestion(self) -> None:
        if not self.congested and self.writer.pending_bytes > self.plane.link_settings.link_buffer:
            self.congested = True
            log.info("link %s congested: %d bytes queued", self.id, self.writer.pending_bytes)

    def _dispatch(self, batch: pb.Batch) -> None:
        plane = self.plane
        stats = plane.stats
        stats.batches_in += 1
        now = self.last_received = time.monotonic()
        if self.expect_since:
            stats.ack_latency.observe(now - self.expect_since)
            self.expect_since = 0.0
        marks, siblings = plane.marks, plane.siblings
        unknown: list[str] = []
        anywhere = self.acts_anywhere
        for f in batch.frames:
            kind = f.WhichOneof("kind")
            if kind == "ping":
                if not f.ping.reply:
                    # The upstream's barrier (Hello.answers_pings): every frame
                    # before it is applied by now, this loop being in order;
                    # the marks it named that we do not hold are told first.
                    if unknown:
                        self.replies.reject_unknown(unknown)
                        unknown = []
                    self.replies.answer_ping(f.ping.id)
                # An answer to ours: receiving it was the point.
                continue
            conn = marks.get(f.mark)
            if conn is None:
                if siblings is not None and kind in ("data", "close"):
                    worker = siblings.owner(f.mark)
                    if worker is not None:
                        self.replies.to_sibling(siblings, worker, f, anywhere, plane.max_frame)
                        continue
                if kind != "close":
                    stats.unknown_mark_frames += 1
                    unknown.append(f.mark)
                continue
            if conn.core.route is not self and not anywhere and not conn.is_stale(self):
                # Push, close or metadata for a mark bound elsewhere: only from
                # upstreams allowed to act on any mark (--push-upstreams).
                self.replies.refuse_foreign(conn.mark, kind)
                continue
            if kind == "data":
                d = f.data
                payload = d.payload
                if len(payload) > plane.max_frame:
                    # Not delivered; the upstream is told and may answer otherwise.
                    stats.bad_frames_from_upstream += 1
                    self.replies.refuse(
                        conn.mark, "payload_too_large", len(payload), plane.max_frame
                    )
                    continue
                stats.frames_out += 1
                stats.bytes_out += len(payload)
                conn.deliver(payload, d.acked, self)
            elif kind == "flow":
                fl = f.flow
                conn.on_flow(fl.credit, fl.acked, self)
            elif kind == "close":
                c = f.close
                # Untrusted text: cleaned (printable, bounded) before it reaches
                # logs, traces and the other upstream; metrics map it to a label.
                conn.upstream_close(
                    reasons.clean(c.reason) or reasons.UPSTREAM_CLOSED,
                    reasons.clean(c.detail, reasons.MAX_DETAIL),
                    self,
                )
            elif kind == "meta":
                size = conn.on_meta(f.meta, plane.max_meta)
                if size:
                    stats.bad_frames_from_upstream += 1
                    self.replies.refuse(conn.mark, "metadata_too_large", size, plane.max_meta)
                elif plane.watch.watchers:
                    plane.watch.changed(conn)
            else:
                stats.bad_frames_from_upstream += 1
                log.warning(
                    "mark=%s upstream %s sent an unexpected frame kind %s", f.mark, self.id, kind
                )
        if unknown:
            self.replies.reject_unknown(unknown)

    @property
    def acts_anywhere(self) -> bool:
        """Whether this upstream may act on marks bound to other upstreams."""
        allowed = self.plane.link_settings.push_upstreams
        return "*" in allowed or self.id in allowed
