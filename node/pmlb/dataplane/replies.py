"""What a link answers its upstream on the node's behalf, besides the marks'
own frames: refusals (pb.Refused), closes for marks the node does not hold,
pushes handed to the sibling worker that holds the mark, and ping answers,
which wait for those pushes.

Split out of dataplane.link so the link keeps the session and the dispatch.
Each answer goes on the link's current stream; each kind of warning is logged
at most once a second, whatever an upstream sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from pmlb.protocol import reasons

if TYPE_CHECKING:
    from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
    from pmlb.dataplane.siblings import Siblings
    from pmlb.observability.stats import NodeStats
    from pmlb.protocol.wire import BatchWriter

log = logging.getLogger("pmlb.link")

LOG_EVERY = 1.0  # seconds between two warnings of one kind, per link


class Link(Protocol):
    """What the answers need of their link (dataplane.link.Link)."""

    @property
    def id(self) -> str: ...
    @property
    def writer(self) -> BatchWriter: ...
    @property
    def is_up(self) -> bool: ...


class Replies:
    __slots__ = (
        "_foreign_logged",
        "_forwards",
        "_late",
        "_late_next",
        "_refused_logged",
        "_unknown_logged",
        "link",
        "stats",
    )

    def __init__(self, link: Link, stats: NodeStats) -> None:
        self.link = link
        self.stats = stats
        self._unknown_logged = 0.0
        self._refused_logged = 0.0
        self._foreign_logged = 0.0
        # Pushes handed to sibling workers, not answered yet (Link._to_sibling);
        # the one task answering the upstream's pings that wait for them, and
        # the next such ping (with the forwards it must wait for).
        self._forwards: set[asyncio.Future[str]] = set()
        self._late: asyncio.Task[None] | None = None
        self._late_next: tuple[int, list[asyncio.Future[str]]] | None = None

    # -- refusals and unknown marks ------------------------------------------------

    def refuse_foreign(self, mark: str, kind: str | None) -> None:
        """A push, close or metadata for a mark bound elsewhere, from an
        upstream not in --push-upstreams."""
        self.stats.refused_pushes += 1
        # Told, so that an SDK can fail the push instead of calling it accepted.
        self._refused(mark, "not_permitted")
        now = time.monotonic()
        if now - self._foreign_logged > LOG_EVERY:
            self._foreign_logged = now
            log.warning(
                "link %s: %s for mark %s, which is bound elsewhere: refused (the upstream "
                "is not in --push-upstreams); %d refused so far",
                self.link.id,
                kind,
                mark,
                self.stats.refused_pushes,
            )

    def refuse(self, mark: str, reason: str, size: int, limit: int) -> None:
        """Tell the upstream a frame of its was not applied (pb.Refused)."""
        self._refused(mark, reason, size, limit)
        now = time.monotonic()
        if now - self._refused_logged > LOG_EVERY:
            self._refused_logged = now
            log.warning(
                "mark=%s upstream %s: %s (%d bytes, limit %d): refused back to it",
                mark,
                self.link.id,
                reason,
                size,
                limit,
            )

    def overloaded(self, mark: str) -> None:
        """A push the node cannot hand on now (too many in flight to siblings)."""
        self.stats.refused_pushes += 1
        self._refused(mark, "overloaded")

    def _refused(self, mark: str, reason: str, size: int = 0, limit: int = 0) -> None:
        writer = self.link.writer
        f = writer.frame()
        f.mark = mark
        r = f.refused
        r.reason = reason
        if size:
            r.size = size
            r.limit = limit
        writer.kick()

    def reject_unknown(self, marks: list[str]) -> None:
        """Tell the upstream these marks are gone (Close unknown_mark)."""
        writer = self.link.writer
        for mark in dict.fromkeys(marks):
            f = writer.frame()
            f.mark = mark
            f.close.reason = reasons.UNKNOWN_MARK
        writer.kick()
        now = time.monotonic()
        if now - self._unknown_logged > LOG_EVERY:
            self._unknown_logged = now
            log.warning(
                "link %s: %d frames for marks this node does not hold (e.g. %r)",
                self.link.id,
                len(marks),
                marks[0],
            )

    # -- pushes for marks of sibling workers, and pings after them ----------------------

    def to_sibling(
        self, siblings: Siblings, worker: int, f: pb.Frame, anywhere: bool, max_frame: int
    ) -> None:
        """A push or close for a mark another worker of this node holds: it is
        bound elsewhere by definition (a link's marks are its worker's)."""
        kind = f.WhichOneof("kind")
        if not anywhere:
            self.refuse_foreign(f.mark, kind)
            return
        if kind == "data":
            size = len(f.data.payload)
            if size > max_frame:
                self.stats.bad_frames_from_upstream += 1
                self.refuse(f.mark, "payload_too_large", size, max_frame)
                return
            done = siblings.push(worker, f.mark, f.data.payload)
        else:
            reason = reasons.clean(f.close.reason) or reasons.UPSTREAM_CLOSED
            done = siblings.push(worker, f.mark, None, reason)
        if done is None:  # too many handed on and not answered yet: say so
            self.overloaded(f.mark)
            return
        self.forwarded(done, f.mark)

    def forwarded(self, done: asyncio.Future[str], mark: str) -> None:
        """A push handed to a sibling worker: until it answers, a ping from the
        upstream waits (the push is not accepted yet); a mark the sibling does
        not hold is answered like one of ours, before that ping's answer."""
        self._forwards.add(done)
        done.add_done_callback(lambda d: self._forward_done(d, mark))

    def _forward_done(self, done: asyncio.Future[str], mark: str) -> None:
        self._forwards.discard(done)
        if not done.cancelled() and done.result() == "not_found" and self.link.is_up:
            self.stats.unknown_mark_frames += 1
            self.reject_unknown([mark])

    def answer_ping(self, ping_id: int) -> None:
        if not self._forwards and self._late is None:
            writer = self.link.writer
            f = writer.frame()
            f.ping.id = ping_id
            f.ping.reply = True
            writer.kick()
            return
        # Pushes handed to sibling workers are not applied yet (or an earlier
        # ping waits for some): answer once they are, in order. A later ping
        # replaces a waiting one, as its answer confirms everything before it
        # too (the SDKs take an answer for every ping up to its id), so one
        # task and one waiting ping is all a flood of pings costs.
        self._late_next = (ping_id, list(self._forwards))
        if self._late is None:
            self._late = asyncio.get_running_loop().create_task(self._answer_late())

    async def _answer_late(self) -> None:
        writer = self.link.writer
        try:
            while self._late_next is not None:
                ping_id, pending = self._late_next
                self._late_next = None
                if pending:  # each bounded by siblings.FORWARD_TIMEOUT
                    await asyncio.wait(pending)
                if writer is not self.link.writer or not self.link.is_up:
                    return  # another stream now: nobody asked it
                f = writer.frame()
                f.ping.id = ping_id
                f.ping.reply = True
                writer.kick()
        finally:
            self._late = None
            self._late_next = None
