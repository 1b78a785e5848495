"""The I/O-free mark core (pmlb.dataplane.mark) against a model of upstreams.

A hypothesis state machine interleaves client messages (empty ones included,
and a read that lands after reading paused), the link congesting and
draining, upstreams processing frames and replying, replies and credit reaching the
node, links breaking, drain moves, move timeouts and late answers from the
old upstream. Upstreams behave like the SDK: they skip sequence numbers they
have seen since the Open, acknowledge on each reply and return credit for
each frame (length + overhead). After every step the invariants users rely on
must hold:

* the client gets one reply per message, in order: nothing lost, nothing twice;
* every message not yet acknowledged is in the replay buffer, contiguously,
  and the buffer's byte count is its frames' length + FRAME_OVERHEAD;
* each upstream processes a mark's messages in increasing seq order;
* memory per mark stays within the documented bound: the replay buffer holds
  at most the peer's window plus one message (a message is taken while
  credit is positive), and parked messages are at most one read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pmlb.dataplane.mark import (
    BOUND,
    CLOSING,
    DROP,
    GRANT,
    MOVE_DONE,
    MOVING,
    POISONED,
    RESUME,
    STALE,
    UNBLOCKED,
    WAITING,
    Mark,
    MarkLimits,
)
from pmlb.protocol.wire import FRAME_OVERHEAD

WINDOW = 2048
MAX_MSG = 300


@dataclass(eq=False)
class Route:
    """One link to one upstream instance, with what is in flight each way."""

    name: int
    peer_window: int = WINDOW
    overhead: int = FRAME_OVERHEAD
    up: deque[tuple[str, int, bytes]] = field(default_factory=deque)  # node -> upstream
    down: deque[tuple[str, int, int]] = field(default_factory=deque)  # upstream -> node
    last: int = 0  # the SDK's de-duplication point for the mark
    processed: list[int] = field(default_factory=list)
    alive: bool = True


class MarkModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mark: Mark[Route] = Mark(MarkLimits(replay_limit=1 << 20, grant_threshold=512))
        self.routes: list[Route] = []
        self.sent: list[bytes] = []  # every message the client wrote, in order
        self.early: list[bytes] = []  # read while not bound (the conn's "early")
        self.received: list[int] = []  # seq of each reply the client got
        self.acked = 0
        self.closed = ""
        self.late_read = False  # a read already landed since reading paused
        self.congested = False  # the bound link's queue is over --link-buffer
        self._bind(self._new_route())

    # -- helpers ------------------------------------------------------------------

    def _new_route(self) -> Route:
        route = Route(len(self.routes))
        self.routes.append(route)
        return route

    def _bind(self, route: Route) -> None:
        self.congested = False  # a new link
        next_seq, _ = self.mark.bind_to(route)
        route.up.append(("open", next_seq, b""))
        for seq, msg in self.mark.replay or ():
            route.up.append(("data", seq, msg))
        self._send(self.early)
        self.early = []
        self._unpark()

    def _send(self, messages: list[bytes]) -> None:
        mark = self.mark
        if not messages:
            return
        if mark.state != BOUND:
            self.early.extend(messages)
            return
        n = mark.take(messages)  # behind any parked ones, as the node does
        route = mark.route
        assert route is not None
        for i, seq in enumerate(range(mark.seq - n + 1, mark.seq + 1)):
            route.up.append(("data", seq, messages[i]))

    def _unpark(self) -> None:
        # ClientConn.resume_if_unblocked's first step.
        if self.mark.state == BOUND and self.mark.credit > 0 and not self.congested:
            parked = self.mark.unpark()
            if parked:
                self._send(parked)

    @property
    def reading(self) -> bool:
        """Whether the conn would read the socket now (else the kernel holds it):
        the node's own rule."""
        return self.mark.reads(self.congested)

    # -- rules ----------------------------------------------------------------------

    @precondition(lambda self: not self.closed and self.reading)
    @rule(sizes=st.lists(st.integers(0, MAX_MSG), min_size=1, max_size=40))
    def client_reads(self, sizes: list[int]) -> None:
        """One socket read's worth of messages (the conn reads while not paused)."""
        messages = [bytes([65 + len(self.sent) % 26]) * n for n in sizes]
        self.sent.extend(messages)
        self._send(messages)

    @precondition(
        lambda self: (
            not self.closed and self.mark.state == BOUND and not self.reading and not self.late_read
        )
    )
    @rule(sizes=st.lists(st.integers(0, MAX_MSG), min_size=1, max_size=40))
    def client_read_lands_after_the_pause(self, sizes: list[int]) -> None:
        """A read the loop delivers after pause_reading (uvloop may): the node
        takes it, behind anything parked; at most one per pause."""
        self.late_read = True
        self.client_reads(sizes)

    @precondition(lambda self: not self.closed)
    @rule(which=st.integers(0, 7), steps=st.integers(1, 8))
    def upstream_processes(self, which: int, steps: int) -> None:
        live = [r for r in self.routes if r.alive and r.up]
        if not live:
            return
        route = live[which % len(live)]
        for _ in range(steps):
            if not route.up:
                return
            kind, seq, payload = route.up.popleft()
            if kind == "open":
                route.last = seq - 1
            elif kind == "moved":
                route.down.append(("close", 0, 0))  # answered after what it had
            elif seq <= route.last:
                route.down.append(("flow", len(payload) + route.overhead, 0))
            else:
                assert not route.processed or seq > route.processed[-1], "order per mark"
                route.processed.append(seq)
                route.last = seq
                route.down.append(("data", seq, seq))  # a reply, acknowledging seq
                route.down.append(("flow", len(payload) + route.overhead, 0))

    @precondition(lambda self: not self.closed)
    @rule(which=st.integers(0, 7), steps=st.integers(1, 8))
    def node_receives(self, which: int, steps: int) -> None:
        live = [r for r in self.routes if r.alive and r.down]
        if not live:
            return
        route = live[which % len(live)]
        mark = self.mark
        for _ in range(steps):
            if not route.down or self.closed:
                return
            kind, a, b = route.down.popleft()
            # The node's decisions, as ClientConn.deliver, on_flow and
            # upstream_close take them: Mark.reply, flow and upstream_closed.
            if kind == "data":
                verdict = mark.reply(route, b, 1)
                if verdict == DROP:
                    continue
                if route is mark.route:
                    self.acked = max(self.acked, b)
                self.received.append(a)
                if verdict & GRANT:
                    mark.take_grant()
            elif kind == "flow":
                if mark.flow(route, a, 0) & UNBLOCKED:
                    self._unpark()
            elif kind == "close":
                verdict = mark.upstream_closed(route)
                if verdict == MOVE_DONE:
                    mark.end_move()
                    self._bind(self._new_route())
                else:  # these upstreams close a mark only to answer a move
                    assert verdict == STALE, verdict

    @precondition(lambda self: not self.closed and self.mark.route is not None)
    @rule()
    def link_breaks(self) -> None:
        route = self.mark.route
        assert route is not None
        route.alive = False
        route.up.clear()
        route.down.clear()
        verdict = self.mark.route_lost()
        if verdict == POISONED:
            self.closed = "poison"
            self.mark.closing()
        elif verdict == RESUME:
            assert self.mark.state == WAITING
            self._bind(self._new_route())

    @precondition(lambda self: not self.closed and self.mark.state == BOUND)
    @rule()
    def drain_starts_a_move(self) -> None:
        route = self.mark.route
        assert route is not None
        assert self.mark.begin_move()
        route.up.append(("moved", 0, b""))

    @precondition(lambda self: not self.closed and self.mark.state == MOVING)
    @rule()
    def move_times_out(self) -> None:
        self.mark.move_timed_out()
        assert self.mark.end_move()
        self._bind(self._new_route())

    @precondition(lambda self: not self.closed and self.mark.route is not None)
    @rule()
    def link_congests(self) -> None:
        """The link's queue went over --link-buffer: its marks stop reading."""
        self.congested = True

    @precondition(lambda self: self.congested)
    @rule()
    def link_drains(self) -> None:
        """Below half of it again: the link resumes its stalled marks."""
        self.congested = False
        self._unpark()

    @rule()
    def time_passes(self) -> None:
        """Nothing happens (also what is left once the mark is closed)."""

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def client_sees_each_reply_once_in_order(self) -> None:
        assert self.received == list(range(1, len(self.received) + 1))

    @invariant()
    def unacknowledged_messages_are_in_the_replay_buffer(self) -> None:
        mark = self.mark
        if self.closed:
            return
        replay = list(mark.replay or ())
        assert [seq for seq, _ in replay] == list(range(self.acked + 1, mark.seq + 1))
        assert all(msg == self.sent[seq - 1] for seq, msg in replay)
        assert mark.replay_bytes == sum(len(m) + FRAME_OVERHEAD for _, m in replay)

    @invariant()
    def memory_per_mark_is_bounded(self) -> None:
        mark = self.mark
        assert mark.replay_bytes <= WINDOW + MAX_MSG + FRAME_OVERHEAD
        # What was read past the credit, and one read that landed after the pause.
        assert len(mark.parked or ()) + len(self.early) <= 80, "at most two reads held back"
        if self.reading:
            self.late_read = False  # reading again: the next pause may see one more
        assert mark.state != CLOSING or self.closed


TestMarkModel = MarkModel.TestCase
TestMarkModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
