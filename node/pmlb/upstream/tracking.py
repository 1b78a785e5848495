"""What an upstream tracks of the node beyond its own marks: which pushes the
node has accepted (Barriers), and the node's marks it watches (WatchedMarks).

Accepted means applied by the node: a push is in its client's write buffer
(or was refused), a metadata change is set. The SDK learns it from a Ping it
sends after the frames: the node answers once it has applied every frame
before the Ping on that stream (Hello.answers_pings), so one Ping confirms
every push made in the same turn of the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import MarkGone, PushRefused

log = logging.getLogger("pmlb.upstream")


def _quiet(fut: asyncio.Future[None]) -> None:
    """A push nobody awaits must not log 'exception was never retrieved': its
    failure is counted (stats) and, for a refusal, logged already."""
    if not fut.cancelled():
        fut.exception()


class Barriers:
    """One stream's pushes waiting for the node to confirm them."""

    __slots__ = ("_loop", "_next_id", "_open", "_sent", "answers", "emit")

    def __init__(self, emit: Callable[[int], None], answers: bool) -> None:
        # emit(ping_id): put a Ping request on the stream, after what is there.
        self.emit = emit
        self.answers = answers  # the node answers our pings (Hello.answers_pings)
        self._loop = asyncio.get_running_loop()
        self._next_id = 0
        # Pushes of this turn, confirmed by a Ping sent at its end.
        self._open: list[tuple[str, asyncio.Future[None]]] | None = None
        # (ping id, pushes) sent and not answered yet, oldest first.
        self._sent: deque[tuple[int, list[tuple[str, asyncio.Future[None]]]]] = deque()

    def track(self, mark: str) -> asyncio.Future[None]:
        """A future for a push to ``mark`` just written on the stream."""
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_quiet)
        if not self.answers:
            # An older node cannot confirm: the push is on its way, no more.
            fut.set_result(None)
            return fut
        if self._open is None:
            self._open = []
            # Once this turn's frames are all written: everything made before
            # the Ping (in this turn) is what its answer confirms.
            self._loop.call_soon(self._seal)
        self._open.append((mark, fut))
        return fut

    def _seal(self) -> None:
        pushes, self._open = self._open, None
        if not pushes:
            return
        self._next_id += 1
        self._sent.append((self._next_id, pushes))
        self.emit(self._next_id)

    def answered(self, ping_id: int) -> bool:
        """The node applied everything before Ping ``ping_id``; False if that
        ping is not ours (then it was an answer to nothing we track)."""
        if not self._sent or ping_id > self._sent[-1][0]:
            return False
        while self._sent and self._sent[0][0] <= ping_id:
            _, pushes = self._sent.popleft()
            for _, fut in pushes:
                if not fut.done():
                    fut.set_result(None)
        return True

    def refuse(self, mark: str, error: Exception) -> int:
        """The node refused a push to ``mark`` (or does not know the mark):
        fail the oldest unconfirmed push to it. How many were failed."""
        for _, pushes in self._waiting():
            for m, fut in pushes:
                if m == mark and not fut.done():
                    fut.set_exception(error)
                    return 1
        return 0

    def gone(self, mark: str) -> int:
        """The node does not know ``mark``: every unconfirmed push to it failed."""
        n = 0
        for _, pushes in self._waiting():
            for m, fut in pushes:
                if m == mark and not fut.done():
                    fut.set_exception(MarkGone(f"mark {mark} is not open on its node"))
                    n += 1
        return n

    def _waiting(self) -> Iterator[tuple[int, list[tuple[str, asyncio.Future[None]]]]]:
        yield from self._sent
        if self._open:
            yield 0, self._open

    def lost(self, why: str) -> None:
        """The stream ended: what it did not confirm may or may not have been applied."""
        for _, pushes in self._waiting():
            for _, fut in pushes:
                if not fut.done():
                    fut.set_exception(
                        PushRefused("unconfirmed", f"the link to the node ended ({why})")
                    )
        self._sent.clear()
        self._open = None


@dataclass(frozen=True)
class MarkInfo:
    """A mark the node holds, as its MarkEvent said (UpstreamServer.marks)."""

    mark: str
    node_id: str
    upstream: str
    client_addr: str
    client_port: int
    accepted_at_unix_ms: int
    metadata: Mapping[str, str] = field(default_factory=dict)


class WatchedMarks(Mapping[str, MarkInfo]):
    """The marks of every node stream that watches (UpstreamServer(watch_marks=True)).

    Each stream reports its own node's (or worker's) marks; a mark is held by
    one of them, so the union is the service's marks on every node this
    upstream has a link with. A stream that ends takes its marks with it (its
    node sends a new snapshot when the link is back).
    """

    def __init__(self, on_change: Callable[[str, MarkInfo | None], None] | None) -> None:
        self._marks: dict[str, tuple[MarkInfo, object]] = {}
        self._by_stream: dict[object, set[str]] = {}
        self._synced: dict[object, asyncio.Event] = {}
        self._on_change = on_change

    def __getitem__(self, mark: str) -> MarkInfo:
        return self._marks[mark][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._marks)

    def __len__(self) -> int:
        return len(self._marks)

    def apply(self, stream: object, node_id: str, mark: str, e: pb.MarkEvent) -> None:
        event = e.event
        if event == "open" and mark:
            info = MarkInfo(
                mark,
                node_id,
                e.upstream,
                e.client_addr,
                e.client_port,
                e.accepted_at_unix_ms,
                dict(e.metadata),
            )
            self._marks[mark] = (info, stream)
            self._by_stream.setdefault(stream, set()).add(mark)
            self._changed(mark, info)
        elif event == "close" and mark:
            held = self._marks.get(mark)
            if held is not None and held[1] is stream:
                del self._marks[mark]
                self._by_stream.get(stream, set()).discard(mark)
                self._changed(mark, None)
        elif event == "snapshot":
            self.forget(stream)
            self._synced.setdefault(stream, asyncio.Event()).clear()
        elif event == "synced":
            self._synced.setdefault(stream, asyncio.Event()).set()
        else:
            log.warning("node %s sent a mark event %r (mark %r): ignored", node_id, event, mark)

    def forget(self, stream: object) -> None:
        """Everything ``stream`` told us (its snapshot restarts, or it ended)."""
        for mark in self._by_stream.pop(stream, set()):
            held = self._marks.get(mark)
            if held is not None and held[1] is stream:
                del self._marks[mark]
                self._changed(mark, None)

    def ended(self, stream: object) -> None:
        self.forget(stream)
        self._synced.pop(stream, None)

    async def synced(self, streams: int, timeout: float) -> None:
        """Until ``streams`` node streams have each sent a whole snapshot."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ready = [e for e in self._synced.values() if e.is_set()]
            if len(ready) >= streams:
                return
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"{len(ready)} of {streams} node streams sent their marks within {timeout}s"
                )
            # Woken by any stream's "synced", or a new stream (short poll:
            # streams that have not connected yet have no event to wait on).
            waits = [
                asyncio.ensure_future(e.wait()) for e in self._synced.values() if not e.is_set()
            ]
            try:
                if waits:
                    await asyncio.wait(waits, timeout=min(left, 0.1))
                else:
                    await asyncio.sleep(min(left, 0.05))
            finally:
                for w in waits:
                    w.cancel()

    def _changed(self, mark: str, info: MarkInfo | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(mark, info)
        except Exception:
            log.exception("mark=%s on_mark raised", mark)
