"""Marks watched by upstreams (Hello.watch_marks): the node's side of MarkEvent.

An upstream that asks for it is told every mark this node (worker) holds, bound
to any upstream, and each change: accepted, bound elsewhere, metadata set,
closed. A broker built on the SDK finds its subscribers this way instead of
polling the control API.

Events go on the watching link's own stream, so a change reaches it before
any later frame the node sends there. They cost nothing unless some upstream
watches. A watcher whose link is congested is not sent events (its queue is
bounded by --link-buffer like everything else on the link); it is marked stale
and sent a fresh snapshot once the link drains, which the SDKs apply by
forgetting what that stream told them and rebuilding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Protocol

from pmlb.protocol import wire

if TYPE_CHECKING:
    from pmlb.protocol.wire import BatchWriter


class Link(Protocol):
    """What the watch needs of a link whose upstream watches marks
    (dataplane.link.Link), declared here so that it is not imported."""

    @property
    def id(self) -> str: ...
    @property
    def writer(self) -> BatchWriter: ...
    @property
    def congested(self) -> bool: ...

    watch_stale: bool  # events were skipped; a snapshot is due on drain


log = logging.getLogger("pmlb.watch")

OPEN: Final = "open"
CLOSE: Final = "close"
SNAPSHOT: Final = "snapshot"
SYNCED: Final = "synced"


class Watched(Protocol):
    """What an event says about a mark (a ClientConn)."""

    @property
    def mark(self) -> str: ...
    @property
    def client_addr(self) -> str: ...
    @property
    def client_port(self) -> int: ...
    @property
    def accepted_ms(self) -> int: ...
    @property
    def meta(self) -> dict[str, str] | None: ...

    @property
    def upstream_id(self) -> str: ...


class MarkWatch:
    """The links whose upstreams watch this node's marks."""

    __slots__ = ("events_sent", "snapshots_sent", "watchers")

    def __init__(self) -> None:
        self.watchers: set[Link] = set()
        self.events_sent = 0
        self.snapshots_sent = 0

    def add(self, link: Link, marks: Iterable[Watched]) -> None:
        """A watching link came up: send it a snapshot."""
        self.watchers.add(link)
        self.snapshot(link, marks)

    def remove(self, link: Link) -> None:
        self.watchers.discard(link)

    def snapshot(self, link: Link, marks: Iterable[Watched]) -> None:
        """Everything this node holds, between "snapshot" and "synced"."""
        link.watch_stale = False
        writer = link.writer
        writer.frame().mark_event.event = SNAPSHOT
        n = 0
        for conn in marks:
            self._event(link, conn, OPEN)
            n += 1
        writer.frame().mark_event.event = SYNCED
        writer.kick()
        self.snapshots_sent += 1
        log.info("link %s: sent a snapshot of %d marks to its watching upstream", link.id, n)

    def changed(self, conn: Watched) -> None:
        """The mark is new, or its upstream or metadata changed."""
        self._tell(conn, OPEN)

    def closed(self, conn: Watched) -> None:
        self._tell(conn, CLOSE)

    def _tell(self, conn: Watched, event: str) -> None:
        for link in self.watchers:
            if link.congested or link.watch_stale:
                # Bounded: nothing queues for a link that is not keeping up;
                # it gets a whole new snapshot once it drains (Link._on_drain).
                link.watch_stale = True
                continue
            self._event(link, conn, event)
            link.writer.kick()

    def _event(self, link: Link, conn: Watched, event: str) -> None:
        writer = link.writer
        f = writer.frame()
        f.mark = conn.mark
        e = f.mark_event
        e.event = event
        size = len(conn.mark)
        if event == OPEN:
            e.upstream = conn.upstream_id
            e.client_addr = conn.client_addr
            e.client_port = conn.client_port
            e.accepted_at_unix_ms = conn.accepted_ms
            if conn.meta:
                e.metadata.update(conn.meta)
                size += sum(len(k) + len(v) for k, v in conn.meta.items())
        # Counted like payload, so a large snapshot makes the link congested
        # (and later events wait for the next snapshot) instead of growing.
        writer.add_payload(size + wire.FRAME_OVERHEAD)
        self.events_sent += 1
