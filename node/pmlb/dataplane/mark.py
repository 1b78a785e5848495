"""The state of one mark, without I/O: credits both ways, the replay buffer
and its acknowledgements, bind / move / resume / close, poison strikes.

``Mark`` knows nothing of sockets, gRPC or the event loop. The socket
protocol (``conn.ClientConn``) holds one (as hypercorn's protocols hold their
h11 or h2 state machine), feeds it events - client messages,
acknowledgements, credit, replies, a link lost, a move - and does what the
answers say: send these frames, pause or resume reading, close with this
reason, resume elsewhere. The link it is bound to is
an opaque ``Route`` (anything with ``peer_window`` and ``overhead``); the
node's ``Link`` is one. This is what tests/unit/test_mark_model.py drives with
a hypothesis state machine against a model of upstreams and links.

States (everything from CLOSING on is "going away")::

    WAITING --bind--> BOUND --client EOF--> CLIENT_EOF --upstream close--> CLOSING
       ^                |  \\--start_move--> MOVING --answered/timed out--> WAITING
       \\--route lost---/

Memory per mark is bounded: the replay buffer holds at most what the credit
let through - ``peer_window`` plus one message (a message is taken while
credit is positive), each frame counted as its length + ``FRAME_OVERHEAD`` -
and ``replay_limit`` closes the mark beyond it (a peer granting credit without
acknowledging); parked messages are at most one read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from pmlb.protocol.wire import FRAME_OVERHEAD

# Order matters: everything from CLOSING on is "going away".
WAITING, BOUND, MOVING, CLIENT_EOF, CLOSING, CLOSED = range(6)
STATE_NAMES: Final = ("waiting", "bound", "moving", "client_eof", "closing", "closed")

# What to do with a mark whose route broke (Mark.route_lost).
RESUME, POISONED, FINISHED, UNAFFECTED = "resume", "poisoned", "finished", "unaffected"
# What to do with an upstream's close (Mark.upstream_closed).
STALE, IGNORE, MOVE_DONE, CLOSE_BOUND, CLOSE = (
    "stale",
    "ignore",
    "move_done",
    "close_bound",
    "close",
)
# Answers of Mark.reply and Mark.flow, or'ed: bits, so the per-frame path
# allocates nothing.
DROP, DELIVER, CLEARED, GRANT, UNBLOCKED = 0, 1, 2, 4, 8


class Route(Protocol):
    """What a mark needs of the link it is bound to."""

    @property
    def peer_window(self) -> int: ...

    @property
    def overhead(self) -> int: ...


R = TypeVar("R", bound=Route)


@dataclass(frozen=True, slots=True)
class MarkLimits:
    """Bounds shared by every mark of a node."""

    replay_limit: int  # --replay-buffer: unacknowledged bytes (with overhead) per mark
    grant_threshold: int  # return credit to the upstream in chunks of this many bytes


class Mark(Generic[R]):
    __slots__ = (
        "binds",
        "credit",
        "limits",
        "owed",
        "parked",
        "parked_eof",
        "replay",
        "replay_bytes",
        "route",
        "seq",
        "stale",
        "state",
        "strike_seq",
        "strikes",
    )

    def __init__(self, limits: MarkLimits) -> None:
        self.limits = limits
        self.state = WAITING
        self.route: R | None = None
        self.binds = 0
        self.seq = 0  # the seq of the last client message taken
        self.credit = 0  # what the bound upstream still accepts (its credit bytes)
        self.owed = 0  # credit to return to the bound upstream for what we delivered
        # Client frames sent upstream and not yet acknowledged, oldest first:
        # replayed, same seq, to the next upstream. None when empty (an idle
        # mark then pays nothing for it). Counted as length + FRAME_OVERHEAD.
        self.replay: deque[tuple[int, bytes]] | None = None
        self.replay_bytes = 0
        # Client messages read but not sent: over the credit. Sent (with an
        # EOF that came after them) once credit returns.
        self.parked: list[bytes] | None = None
        self.parked_eof = False
        # Poison detection: how many routes in a row broke while this mark had
        # unacknowledged frames on them, and the last seq in flight at the
        # latest such break. An ack reaching strike_seq clears the strikes.
        self.strikes = 0
        self.strike_seq = 0
        # Routes a move timed out on: what they still send for this mark is
        # stale (the next upstream answers the same messages) until each one
        # answers the move with its close, or the mark is bound to it again: at
        # most one entry per upstream of the service.
        self.stale: list[R] | None = None

    # -- client -> upstream -------------------------------------------------------

    def take(self, messages: list[bytes]) -> int:
        """Take client messages to send now; returns how many (the first n of
        ``messages``, numbered ``seq - n + 1 .. seq``). The rest are parked.

        Credit is checked per message, not per read: one read can hold tens of
        thousands of small messages, and each one costs its length plus the
        route's per-frame overhead."""
        route = self.route
        assert route is not None
        assert self.state == BOUND
        budget = self.credit
        if budget <= 0 or self.parked is not None:
            # Behind what is parked already (a read that came after the pause):
            # messages go out in order.
            self._park(messages)
            return 0
        per_frame = route.overhead
        replay = self.replay
        if replay is None:
            replay = self.replay = deque()
        seq = self.seq
        spent = local = 0
        n = 0
        for msg in messages:
            if budget - spent <= 0:
                break
            size = len(msg)
            spent += size + per_frame
            local += size + FRAME_OVERHEAD
            seq += 1
            replay.append((seq, msg))
            n += 1
        self.seq = seq
        self.credit = budget - spent
        self.replay_bytes += local
        if n < len(messages):
            self._park(messages[n:])
        return n

    def _park(self, messages: list[bytes]) -> None:
        if self.parked is None:
            self.parked = messages
        else:
            self.parked.extend(messages)

    def reads(self, congested: bool) -> bool:
        """Whether the client's socket should be read now: bound, with credit,
        nothing parked, and the link not congested. Otherwise the kernel
        holds the client's bytes (backpressure)."""
        return self.state == BOUND and self.credit > 0 and self.parked is None and not congested

    def eof_due(self) -> bool:
        """A client EOF was waiting behind parked messages, which are now all
        sent: pass it on (once)."""
        if self.parked_eof and self.parked is None:
            self.parked_eof = False
            return True
        return False

    @property
    def replay_overflowed(self) -> bool:
        return self.replay_bytes > self.limits.replay_limit

    def unpark(self) -> list[bytes] | None:
        """The parked messages, to offer to ``take`` again (credit returned)."""
        parked, self.parked = self.parked, None
        return parked

    # -- upstream -> node ---------------------------------------------------------
    # The node's link calls reply, flow and upstream_closed for each frame of
    # the mark's; their answers say what to do (the model test acts on the
    # same answers).

    def reply(self, route: R | None, acked: int, size: int) -> int:
        """A reply of ``size`` payload bytes from ``route`` (None: the control
        API) carrying acknowledgement ``acked``. Returns DROP (a late answer
        of a route a move timed out on: the next upstream answers the same
        messages), or DELIVER with CLEARED (the strikes are cleared) and GRANT
        (credit is due back to the route) or'ed in."""
        if self.stale is not None and self.is_stale(route):
            return DROP
        if route is None or route is not self.route:
            return DELIVER  # a push, or a reply of a route this mark moved off
        out = DELIVER
        if acked and self.replay and self.ack(acked):
            out |= CLEARED
        self.owed += size + route.overhead
        if self.owed >= self.limits.grant_threshold:
            out |= GRANT
        return out

    def flow(self, route: R, credit: int, acked: int) -> int:
        """Credit (and an acknowledgement) from ``route``: CLEARED and
        UNBLOCKED (credit came back to a mark that had none) or'ed, 0 for a
        route the mark is not bound to."""
        if route is not self.route:
            return 0
        out = 0
        if acked and self.ack(acked):
            out |= CLEARED
        if self.add_credit(credit):
            out |= UNBLOCKED
        return out

    def upstream_closed(self, route: R) -> str:
        """``route`` closed the mark: STALE (the late answer to a timed-out
        move: drop it), IGNORE (going away already), MOVE_DONE (the old
        upstream answered the move: bind elsewhere), CLOSE_BOUND (another
        upstream closed a mark bound here: tell the bound one, then close),
        or CLOSE."""
        if self.stale_close(route):
            return STALE
        if self.state >= CLOSING:
            return IGNORE
        if self.state == MOVING and route is self.route:
            return MOVE_DONE
        if route is not self.route and self.state == BOUND:
            return CLOSE_BOUND
        return CLOSE

    def ack(self, acked: int) -> bool:
        """Trim the replay buffer up to ``acked``; True when that clears the
        strikes (what was in flight at the last break was processed)."""
        replay = self.replay
        if not replay:
            return False
        size = 0
        while replay and replay[0][0] <= acked:
            size += len(replay.popleft()[1]) + FRAME_OVERHEAD
        self.replay_bytes -= size
        if not replay:
            self.replay = None
        if self.strikes and acked >= self.strike_seq:
            self.strikes = 0
            return True
        return False

    def add_credit(self, credit: int) -> bool:
        """Credit from the bound upstream; True when the mark was blocked and is not."""
        was_blocked = self.credit <= 0
        self.credit += credit
        return was_blocked and self.credit > 0

    def is_stale(self, route: R | None) -> bool:
        """Whether a frame from ``route`` is a late answer to a timed-out move."""
        stale = self.stale
        return stale is not None and route is not None and any(r is route for r in stale)

    def stale_close(self, route: R) -> bool:
        """A close from ``route``: True (and that move is settled) if it is the
        late answer to a timed-out move, to be dropped."""
        if not self.is_stale(route):
            return False
        self._unstale(route)
        return True

    def _unstale(self, route: R) -> None:
        stale = self.stale
        if stale is not None:
            stale[:] = [r for r in stale if r is not route]
            if not stale:
                self.stale = None

    def replied(self, size: int, route: R | None) -> bool:
        """``size`` payload bytes were written to the client. True when they came
        from the bound route, whose credit for them is now owed back."""
        if route is None or route is not self.route:
            return False
        self.owed += size + route.overhead
        return True

    def grant_due(self) -> bool:
        return self.owed >= self.limits.grant_threshold

    def take_grant(self) -> int:
        owed, self.owed = self.owed, 0
        return owed

    # -- binding --------------------------------------------------------------------

    def bind_to(self, route: R) -> tuple[int, bool]:
        """Bind to ``route``: (the seq of the first frame that follows the Open,
        whether it resumes an earlier bind). The caller sends the Open, then
        ``replay`` in order."""
        self.route = route
        self._unstale(route)
        self.binds += 1
        self.state = BOUND
        unacked = self.replay_bytes
        if not route.overhead:  # a protocol 1 peer counts payload bytes only
            unacked -= len(self.replay or ()) * FRAME_OVERHEAD
        self.credit = route.peer_window - unacked
        self.owed = 0
        replay = self.replay
        return (replay[0][0] if replay else self.seq + 1), self.binds > 1

    def route_lost(self) -> str:
        """The bound route broke. RESUME: bind elsewhere (state WAITING);
        POISONED: close it, reason poison (its frames were in flight on two
        routes that broke in a row); FINISHED: the client had left and nothing
        is owed, close it; UNAFFECTED: not bound (closing, or waiting)."""
        if self.state not in (BOUND, MOVING, CLIENT_EOF):
            return UNAFFECTED
        replay = self.replay
        if replay:
            self.strikes += 1
            self.strike_seq = replay[-1][0]
            if self.strikes >= 2:
                return POISONED
        self.route = None
        if self.state == CLIENT_EOF and not replay:
            return FINISHED
        self.state = WAITING
        return RESUME

    def begin_move(self) -> bool:
        """Start moving off the bound route (drain); False if not bound."""
        if self.state != BOUND or self.route is None:
            return False
        self.state = MOVING
        return True

    def move_timed_out(self) -> None:
        """The old route did not answer the move in time: what it sends for
        this mark from now on is stale."""
        route = self.route
        if route is None:
            return
        if self.stale is None:
            self.stale = []
        self.stale.append(route)

    def end_move(self) -> bool:
        """The move is over (answered or timed out): WAITING for a new bind."""
        if self.state != MOVING:
            return False
        self.route = None
        self.state = WAITING
        return True

    def client_eof(self) -> bool:
        """The client closed its side while bound. False while messages are
        parked (the EOF waits behind them); True: tell the upstream."""
        if self.parked is not None:
            self.parked_eof = True
            return False
        self.state = CLIENT_EOF
        return True

    def closing(self) -> None:
        """Going away. The route stays, for the close's log line and trace."""
        self.state = CLOSING
