"""Poison and probation: which suspect mark may resume where. No I/O.

A link that breaks while a mark has frames in flight on it makes that mark a
*suspect* (``Mark.strikes``); a second broken link with its frames in flight
is the poison verdict (``Mark.route_lost``), and the mark is closed rather
than replayed to a third upstream. To tell the poison from the marks that
merely shared its first link, each suspect resumes on an upstream only while
no other suspect is on probation there. Its probation ends when:

* its replayed frames are acknowledged (``cleared``): it did not break it;
* it leaves the link (closed, moved): ``left``;
* PROBATION_TIMEOUT passes (``expired``): a suspect that is merely slow does
  not hold the others back for ever;
* the link breaks (``broke``): then the node-wide lock is held BREAK_HOLD
  longer, so no worker resumes a suspect into a connection that is dead.

``Probation`` keeps who is on probation on which upstream; with several
workers, ``lock`` (dataplane.siblings.NodeProbation) makes that node-wide. It
arms no timer and binds nothing: the plane arms the timer ``begin`` asks for
and, when an ending returns True, lets the waiting suspects try again.
tests/unit/test_probation.py checks the rules; tests/faults/test_poison_workers
checks them with real upstreams dying of a poison message.
"""

from __future__ import annotations

from typing import Final, Generic, Protocol, TypeVar

# How long a suspect may be on probation before the next one may try.
PROBATION_TIMEOUT: Final = 1.0
# After a link broke with a suspect on probation (the upstream likely died of
# it), the node-wide lock is kept this long: the siblings' links to the same
# process notice the break by then (a dead process's kernel resets them at
# once), so none of their suspects is resumed into a connection already dead.
BREAK_HOLD: Final = 1.0


class NodeLock(Protocol):
    """One lock per upstream shared by the node's workers."""

    def acquire(self, upstream: str) -> bool: ...

    def release(self, upstream: str, hold: float = 0.0) -> None: ...


M = TypeVar("M")


class Probation(Generic[M]):
    """Who is on probation where (at most one suspect per upstream)."""

    __slots__ = ("_lock", "_on")

    def __init__(self, lock: NodeLock | None = None) -> None:
        self._lock = lock
        self._on: dict[str, M] = {}

    @property
    def shared(self) -> bool:
        """Whether other workers hold suspects too: their probations end
        without telling this one, so waiting suspects must look again."""
        return self._lock is not None

    def free(self, upstream: str) -> bool:
        """No suspect of this worker is on probation on ``upstream``."""
        return upstream not in self._on

    def holder(self, upstream: str) -> M | None:
        return self._on.get(upstream)

    def begin(self, upstream: str, suspect: M) -> bool:
        """Put ``suspect`` on probation on ``upstream``; False when another is
        on probation there (in this worker or, with the lock, any worker).
        On True the caller binds it there and arms PROBATION_TIMEOUT."""
        if upstream in self._on:
            return False
        if self._lock is not None and not self._lock.acquire(upstream):
            return False
        self._on[upstream] = suspect
        return True

    def cleared(self, suspect: M) -> str | None:
        """``suspect``'s frames were acknowledged: the upstream whose
        probation this ends (the next suspect may go there), or None."""
        for upstream, held in self._on.items():
            if held is suspect:
                self._end(upstream, 0.0)
                return upstream
        return None

    def left(self, upstream: str, suspect: M) -> bool:
        """``suspect`` left ``upstream`` (closed, moved): True if that ended
        its probation there."""
        if self._on.get(upstream) is not suspect:
            return False
        self._end(upstream, 0.0)
        return True

    def expired(self, upstream: str, suspect: M) -> bool:
        """PROBATION_TIMEOUT passed for ``suspect`` on ``upstream``: True if it
        was still on probation there (it no longer is)."""
        return self.left(upstream, suspect)

    def broke(self, upstream: str) -> M | None:
        """The link to ``upstream`` broke: the suspect that was on probation
        there, if any. The node-wide lock stays held BREAK_HOLD."""
        suspect = self._on.get(upstream)
        if suspect is not None:
            self._end(upstream, BREAK_HOLD)
        return suspect

    def _end(self, upstream: str, hold: float) -> None:
        del self._on[upstream]
        if self._lock is not None:
            self._lock.release(upstream, hold)
