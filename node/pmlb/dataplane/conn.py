"""One client TCP connection: the socket side of a mark (the class the plane
makes, in three layers: ``connbase`` (its state and shared helpers),
``clientside`` (the client's socket) and, here, the mark's upstream side).

A ClientConn is an ``asyncio.Protocol`` holding a ``mark.Mark`` (``core``),
the I/O-free state of the mark (credits, replay buffer, bind / move / resume,
strikes): the loop calls it back on reads, no task or stream per connection,
which keeps an idle connection at a few hundred bytes of Python objects. This
module turns socket events into Mark calls and Mark answers into frames,
pauses, closes. See mark.py for the states and the decisions.

Flow control, both ways, per mark:

* client -> upstream: ``credit`` is what the bound upstream still accepts; at
  zero (or while the link itself is congested) the socket stops being read, so
  the kernel pushes back on the client.
* upstream -> client: payloads are written to the transport and their bytes
  are returned to the upstream as Flow credit, but only while the transport's
  buffer is under ``client_buffer``; a client that does not read thus holds at
  most ``client_buffer + window`` bytes here. Data beyond a hard bound (only a
  peer ignoring credit, or pushes, can cause it) closes the mark with
  ``write_overflow``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pmlb.dataplane import proxyproto
from pmlb.dataplane.clientside import ClientSide
from pmlb.dataplane.connbase import Link, Plane
from pmlb.dataplane.mark import (
    BOUND,
    CLEARED,
    CLIENT_EOF,
    CLOSE_BOUND,
    CLOSED,
    CLOSING,
    FINISHED,
    GRANT,
    IGNORE,
    MOVE_DONE,
    MOVING,
    POISONED,
    RESUME,
    STALE,
    UNBLOCKED,
    WAITING,
)
from pmlb.errors import FrameTooLarge
from pmlb.observability.logs import fields
from pmlb.protocol import reasons, wire

if TYPE_CHECKING:
    from pmlb._proto.pmlb.v1 import upstream_pb2 as pb

log = logging.getLogger("pmlb.conn")

__all__ = ["BOUND", "CLIENT_EOF", "CLOSED", "CLOSING", "MOVING", "WAITING", "ClientConn"]


class ClientConn(ClientSide):
    """A client connection, as the plane makes it; its upstream side here."""

    __slots__ = ()

    def __init__(
        self, plane: Plane[ClientConn], proxied: proxyproto.ProxyHeader | None = None
    ) -> None:
        super().__init__(plane, proxied)

    def bind(self, link: Link[ClientConn]) -> None:
        """Bind this (waiting) mark to ``link``: send its Open, then replay what
        the previous upstream had not acknowledged, with the same seq numbers."""
        self._disarm()
        next_seq, resumed = self.core.bind_to(link)
        link.attach(self)
        cfg = self.plane.config
        writer = link.writer
        f = writer.frame()
        f.mark = self.mark
        o = f.open
        o.service = cfg.service
        o.client_addr = self.client_addr
        o.client_port = self.client_port
        o.node_id = cfg.node_id
        replay = self.core.replay
        o.next_seq = next_seq
        o.framing = cfg.framing
        o.max_frame = self.plane.max_frame
        o.max_meta = self.plane.max_meta
        o.listener = self.plane.listener_name
        o.accepted_at_unix_ms = self.accepted_ms
        o.resumed = resumed
        if self.meta:
            o.metadata.update(self.meta)
        if self.span is not None:
            tracer = self.plane.tracer
            o.trace_context.update(tracer.carrier(self.span))
            tracer.child(
                self.span,
                "pmlb.failover" if resumed else "pmlb.bind",
                {
                    "pmlb.mark": self.mark,
                    "pmlb.upstream": link.id,
                    "pmlb.resumed": resumed,
                    "pmlb.replayed_frames": len(replay or ()),
                },
            )
            self.span.set_attribute(f"pmlb.upstream.{self.core.binds}", link.id)
        if replay:
            for seq, msg in replay:
                f = writer.frame()
                f.mark = self.mark
                d = f.data
                d.seq = seq
                d.payload = msg
            writer.add_payload(self.core.replay_bytes)
            if not link.expect_since:
                link.expect_since = time.monotonic()
        writer.kick()
        if self.plane.watch.watchers:
            self.plane.watch.changed(self)
        if resumed:
            self.plane.stats.failovers += 1
            if self.lost_at:
                self.plane.stats.failover_time.observe(time.monotonic() - self.lost_at)
                self.lost_at = 0.0
            log.info(
                "mark=%s resumed on upstream=%s, %d frames replayed from seq %d",
                self.mark,
                link.id,
                len(replay or ()),
                o.next_seq,
                extra=fields(mark=self.mark, upstream=link.id),
            )
        else:
            log.debug("mark=%s bound upstream=%s", self.mark, link.id)
        early, self.early = self.early, None
        for data in early or ():
            if data:
                self.data_received(data)
            elif self.eof_received() is False and self.transport is not None:
                self.transport.close()
        if self.read_paused:
            self.resume_if_unblocked()

    def deliver(self, payload: bytes, acked: int, link: Link[Any] | None) -> None:
        """Data for the client from an upstream (``link``) or the control API (None);
        ``acked`` is the acknowledgement riding on it."""
        verdict = self.core.reply(link, acked, len(payload))
        if not verdict:
            # A late reply of the upstream this mark was moved off after its
            # move timed out: the frames it answers were replayed to the next
            # upstream, which answers them; delivering both would duplicate.
            self.plane.stats.stale_replies += 1
            return
        if verdict & CLEARED:
            # What was in flight when the last link broke has been processed:
            # this mark did not break it.
            self.plane.cleared(self)
        transport = self.transport
        if self.core.state >= CLOSING or transport is None:
            return
        try:
            out = self.plane.encode(payload)
        except FrameTooLarge as exc:
            self.plane.stats.bad_frames_from_upstream += 1
            log.warning(
                "mark=%s upstream %s sent a payload the framing cannot carry: %s",
                self.mark,
                link.id if link else "control API",
                exc,
            )
            self.close(reasons.PROTOCOL_ERROR, f"upstream payload too large: {exc}")
            return
        transport.write(out)
        self.last_active = time.monotonic()
        n = len(payload)
        self.bytes_out += n
        self.frames_out += 1
        if not self.write_paused:
            if verdict & GRANT:
                self._grant()
            return
        self.paused_frames += 1
        buffered = transport.get_write_buffer_size() + self.paused_frames * wire.FRAME_OVERHEAD
        if buffered > self.plane.write_hard_limit:
            self.plane.stats.write_overflows += 1
            log.warning(
                "mark=%s client is not reading; %d bytes buffered, closing",
                self.mark,
                transport.get_write_buffer_size(),
            )
            self.close(reasons.WRITE_OVERFLOW, "client buffer bound exceeded", abort=True)

    def on_flow(self, credit: int, acked: int, link: Link[Any]) -> None:
        verdict = self.core.flow(link, credit, acked)
        if verdict & CLEARED:
            self.plane.cleared(self)
        if verdict & UNBLOCKED:
            self.resume_if_unblocked()

    def on_meta(self, meta: pb.Meta, max_bytes: int) -> int:
        """Apply an upstream's metadata change: 0, or the size it would have
        reached when that exceeds the bound (then nothing changes)."""
        current = dict(self.meta or {})
        current.update(meta.set)
        for key in meta.unset:
            current.pop(key, None)
        size = sum(len(k) + len(v) for k, v in current.items())
        if size > max_bytes:
            return size
        self.meta = current or None
        return 0

    def upstream_close(self, reason: str, detail: str, link: Link[Any]) -> None:
        verdict = self.core.upstream_closed(link)
        if verdict == STALE:
            # The answer to our "moved" close, after the move had timed out.
            self.plane.stats.stale_replies += 1
            return
        if verdict == IGNORE:
            return
        if verdict == MOVE_DONE:
            # The old upstream acknowledged the move after answering everything
            # it had: now bind elsewhere and replay whatever is still unacked.
            self._finish_move()
            return
        if verdict == CLOSE_BOUND:
            # Closed by another upstream (push): the bound one must forget it too.
            self._send_close(reason, detail)
        self.close(reason, detail, notify=False)

    def on_link_lost(self) -> None:
        """The bound upstream is gone: keep the mark and move it (failover),
        unless its frames were in flight on the previous broken link too."""
        was_eof = self.core.state == CLIENT_EOF
        link = self.core.route
        verdict = self.core.route_lost()
        if verdict == POISONED:
            self._poisoned()
        elif verdict == FINISHED:
            self.close(reasons.CLIENT_CLOSED, "upstream lost after the last reply", notify=False)
        elif verdict == RESUME:
            self.lost_at = time.monotonic()
            if link is not None:
                link.detach(self)
            if was_eof:
                # The client is done sending but replies are owed: resume
                # elsewhere and pass the EOF on after the replay.
                (self.early or self._start_early()).append(b"")
            self.plane.rebind(self)

    def _poisoned(self) -> None:
        # Like a poison message in a queue: the frames this mark had in flight
        # took down two upstreams in a row. Replaying them to a third would
        # most likely take it down as well, and every mark on it.
        replay = self.core.replay
        first, last = (replay[0][0], replay[-1][0]) if replay else (0, 0)
        self.plane.stats.poisoned += 1
        log.warning(
            "mark=%s frames %d..%d were in flight on two upstream links that broke "
            "in a row; closing the mark instead of replaying them again",
            self.mark,
            first,
            last,
            extra=fields(mark=self.mark, reason=reasons.POISON),
        )
        if self.span is not None:
            self.plane.tracer.child(
                self.span, "pmlb.poison", {"pmlb.first_seq": first, "pmlb.last_seq": last}
            )
        self.close(
            reasons.POISON,
            f"frames {first}..{last} in flight on two links that broke",
            notify=False,
        )

    def start_move(self, detail: str) -> None:
        """Move this mark off its upstream gracefully (drain): stop reading, ask the
        upstream to close it after answering what it has, then rebind."""
        link = self.core.route
        if link is None or self.core.state != BOUND:
            return
        self._send_close(reasons.MOVED, detail)
        self.core.begin_move()
        if self.span is not None:
            self.plane.tracer.child(
                self.span, "pmlb.move", {"pmlb.from_upstream": link.id, "pmlb.why": detail}
            )
        self._pause_reading()
        self._arm(self.plane.config.move_timeout, self._move_timed_out)

    def pause_for_handover(self) -> None:
        """An unbound mark about to be handed over (dataplane.handoff):
        nothing more is read, no timer runs."""
        self._disarm()
        self._pause_reading()

    def handed_off(self) -> None:
        """The successor holds the socket now: close ours, telling nobody."""
        self.core.closing()
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def _move_timed_out(self) -> None:
        self.timer = None
        if self.core.state != MOVING:
            return
        self.core.move_timed_out()
        self.plane.stats.move_timeouts += 1
        log.warning(
            "mark=%s upstream %s did not answer the move within %.1fs; moving on, "
            "its late replies for this mark will be dropped",
            self.mark,
            self.core.route.id if self.core.route else "-",
            self.plane.config.move_timeout,
        )
        self._finish_move()

    def _finish_move(self) -> None:
        self.timer = None
        if self.core.state != MOVING:
            return
        self._detach()
        self.core.end_move()
        self.plane.rebind(self)
