"""What every client connection is, whichever side of it is at work: its
slots, its Mark (``core``), the state the plane, links and admin API read,
and the helpers both sides use (close, the timer, frames to the bound link,
pausing). ``conn.ClientConn`` is the class the plane makes; it is built in
three layers, each a file: this base, ``clientside`` (the client's socket:
reads, backpressure, EOF, PROXY headers) and ``conn`` (the mark's link:
bind and replay, replies, credit, closes, failover, moves).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pmlb.dataplane import proxyproto
from pmlb.dataplane.mark import (
    BOUND,
    CLIENT_EOF,
    CLOSING,
    MOVING,
    STATE_NAMES,
    WAITING,
    Mark,
)
from pmlb.protocol import wire

if TYPE_CHECKING:
    from pmlb.config import NodeConfig
    from pmlb.dataplane.framing import Decoder
    from pmlb.dataplane.mark import MarkLimits
    from pmlb.dataplane.watch import MarkWatch
    from pmlb.observability.stats import NodeStats
    from pmlb.observability.tracing import ConnTracer

log = logging.getLogger("pmlb.conn")

C = TypeVar("C", bound="ConnBase")
C_contra = TypeVar("C_contra", bound="ConnBase", contravariant=True)


# What a connection needs of the link it is bound to (dataplane.link.Link)
# and of its data plane (dataplane.plane.DataPlane), declared here so that
# neither module is imported by this one: the plane and its links are built
# on connections, not the other way round.
class Link(Protocol[C]):
    @property
    def id(self) -> str: ...
    @property
    def writer(self) -> wire.BatchWriter: ...
    @property
    def overhead(self) -> int: ...
    @property
    def peer_window(self) -> int: ...
    @property
    def is_up(self) -> bool: ...
    @property
    def congested(self) -> bool: ...
    @property
    def stalled(self) -> set[C]: ...

    expect_since: float  # when the link began to wait for an answer (0: not)

    def attach(self, conn: C) -> None: ...
    def detach(self, conn: C) -> None: ...
    def check_congestion(self) -> None: ...


class Plane(Protocol[C_contra]):
    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def tracer(self) -> ConnTracer: ...
    @property
    def watch(self) -> MarkWatch: ...
    @property
    def mark_limits(self) -> MarkLimits: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def max_meta(self) -> int: ...
    @property
    def listener_name(self) -> str: ...
    @property
    def write_hard_limit(self) -> int: ...
    @property
    def encode(self) -> Callable[[bytes], bytes]: ...

    def new_decoder(self) -> Decoder: ...
    def expects_proxy(self, addr: str) -> bool: ...
    def accept(self, conn: C_contra) -> None: ...
    def rebind(self, conn: C_contra) -> None: ...
    def unwait(self, conn: C_contra) -> None: ...
    def forget(self, conn: C_contra) -> None: ...
    def cleared(self, conn: C_contra) -> None: ...


class ConnBase(asyncio.Protocol):
    __slots__ = (
        "_proxied",
        "accepted_ms",
        "bytes_in",
        "bytes_out",
        "client_addr",
        "client_port",
        "close_reason",
        "core",
        "decoder",
        "early",
        "frames_in",
        "frames_out",
        "last_active",
        "lost_at",
        "mark",
        "meta",
        "paused_frames",
        "plane",
        "proxy_buf",
        "read_paused",
        "span",
        "timer",
        "transport",
        "write_paused",
    )

    def __init__(self, plane: Plane[Any], proxied: proxyproto.ProxyHeader | None = None) -> None:
        # The I/O-free state of the mark (dataplane.mark): this class turns
        # socket events into its calls and does what its answers say.
        self.core: Mark[Link[Any]] = Mark(plane.mark_limits)
        # A PROXY header the acceptor already read (before a TLS handshake).
        self.proxy_buf: bytes | None = None
        self._proxied = proxied
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        self.mark = ""
        self.decoder = plane.new_decoder()
        self.bytes_in = self.bytes_out = self.frames_in = self.frames_out = 0
        self.read_paused = False
        self.write_paused = False
        self.meta: dict[str, str] | None = None
        # Reads (and EOF) that arrived before a bind. uvloop ignores a
        # pause_reading() made inside connection_made, so a waiting client's
        # first read can still arrive; it is kept (at most one read per pause)
        # and forwarded after the Open. b"" marks an EOF.
        self.early: list[bytes] | None = None
        # Frames written to the client while its transport was paused.
        self.paused_frames = 0
        self.span: Any = None  # the connection's root span when tracing is on
        self.timer: asyncio.TimerHandle | None = None
        self.close_reason = ""
        self.client_addr = ""
        self.client_port = 0
        self.accepted_ms = 0
        self.last_active = 0.0  # monotonic time of the last byte either way
        self.lost_at = 0.0  # when its link broke, until it resumes (failover time)

    # What the plane, its links and the admin API read of the mark.
    @property
    def state(self) -> int:
        return self.core.state

    @property
    def route(self) -> Link[Any] | None:
        return self.core.route

    @property
    def strikes(self) -> int:
        return self.core.strikes

    @property
    def binds(self) -> int:
        return self.core.binds

    def is_stale(self, route: Link[Any] | None) -> bool:
        return self.core.is_stale(route)

    @property
    def upstream_id(self) -> str:
        """The id of the upstream the mark is bound to ("" while unbound)."""
        return self.core.route.id if self.core.route is not None else ""

    def describe(self) -> dict[str, Any]:
        return {
            "mark": self.mark,
            "client_addr": self.client_addr,
            "client_port": self.client_port,
            "upstream": self.core.route.id if self.core.route else "",
            "state": STATE_NAMES[self.core.state],
            "metadata": dict(self.meta or {}),
            "accepted_at_unix_ms": self.accepted_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "binds": self.core.binds,
            "unacked_frames": len(self.core.replay or ()),
        }

    def close(
        self, reason: str, detail: str = "", *, notify: bool = True, abort: bool = False
    ) -> None:
        """Close the client connection (flushing what it has, unless ``abort``)."""
        if self.core.state >= CLOSING:
            return
        if self.core.state == WAITING:
            self.plane.unwait(self)
        elif self.core.state in (BOUND, MOVING) and notify:
            self._send_close(reason, detail)
        if self.core.state != CLIENT_EOF or not self.close_reason:
            self.close_reason = reason
        self._detach()
        self.core.closing()
        self._disarm()
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A client that does not read would keep close() pending forever.
            self._arm(self.plane.config.close_linger, transport.abort)

    def _send_close(self, reason: str, detail: str) -> None:
        link = self.core.route
        if link is None or not link.is_up:
            return
        f = link.writer.frame()
        f.mark = self.mark
        c = f.close
        c.reason = reason
        if detail:
            c.detail = detail
        link.writer.kick()

    def _grant(self) -> None:
        link = self.core.route
        if link is None or not link.is_up:
            return
        f = link.writer.frame()
        f.mark = self.mark
        f.flow.credit = self.core.take_grant()
        link.writer.kick()

    def _detach(self) -> None:
        link = self.core.route
        if link is not None:
            link.detach(self)

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            if self.core.state == BOUND:
                self.plane.stats.credit_stalls += 1
                if self.core.route is not None and self.core.route.congested:
                    self.core.route.stalled.add(self)

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _start_early(self) -> list[bytes]:
        self.early = []
        return self.early
