"""Placing marks on links: a new mark on the balancer's pick, a mark whose
link went away on another one (failover), the marks waiting for a routable
upstream (bounded in time by --connect-timeout), and suspects one at a time
per upstream (dataplane.probation). Split out of dataplane.plane; the plane
calls it and it calls back only the marks' own ``bind`` and waits.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Final

from pmlb.dataplane.balancer import Balancer
from pmlb.dataplane.conn import ClientConn
from pmlb.dataplane.probation import PROBATION_TIMEOUT, Probation
from pmlb.dataplane.upstreams import UpstreamLink

# How often parked suspects look again for an upstream whose probation lock a
# sibling worker holds (its probation ends without telling this worker).
PROBATION_POLL: Final = 0.05


class Placement:
    def __init__(
        self,
        balancer: Balancer,
        suspects: Probation[ClientConn],
        routable: Callable[[], list[UpstreamLink]],
        connect_timeout: Callable[[], float],
    ) -> None:
        self._balancer = balancer
        self._suspects = suspects
        self._routable = routable
        self._connect_timeout = connect_timeout  # reloadable
        self.waiting: dict[ClientConn, None] = {}  # insertion-ordered set
        self._probation_retry: asyncio.TimerHandle | None = None
        self._probation_timers: dict[str, asyncio.TimerHandle] = {}

    def place_new(self, conn: ClientConn) -> bool:
        """A new mark: bind it, or let it wait (reading paused) for an
        upstream, at most --connect-timeout. Whether it is bound."""
        link = self._balancer.pick(self._routable(), _client_key(conn.client_addr))
        if link is not None:
            conn.bind(link)
            return True
        self.waiting[conn] = None
        conn.wait_for_upstream(self._connect_timeout())
        return False

    def unwait(self, conn: ClientConn) -> None:
        self.waiting.pop(conn, None)

    def bind_waiting(self) -> None:
        """Bind the marks waiting for an upstream, in order, while they fit."""
        if not self.waiting:
            return
        targets = self._routable()
        if not targets:
            return
        for conn in list(self.waiting):
            if self._place(conn, targets):
                del self.waiting[conn]

    def _place(self, conn: ClientConn, targets: list[UpstreamLink]) -> bool:
        """Bind ``conn`` to one of ``targets``; False when it has to wait.

        A suspect mark (its unacknowledged frames were in flight on a link
        that broke) goes only to a link with no other suspect on probation,
        and is on probation there until those frames are acknowledged
        (DataPlane.cleared) or PROBATION_TIMEOUT passes. If it is the
        poison, only it is in flight on the next link when that breaks too,
        so only it reaches the second strike; the marks that merely shared
        its first link wait their turn and are not charged.
        """
        key = _client_key(conn.client_addr)
        if not conn.strikes:
            link = self._balancer.pick(targets, key) if targets else None
            if link is None:
                return False
            conn.bind(link)
            return True
        suspects = self._suspects
        targets = [lk for lk in targets if suspects.free(lk.id)]
        while targets:
            link = self._balancer.pick(targets, key)
            if link is None:
                break
            # The other workers' suspects count too (one node, several processes).
            if suspects.begin(link.id, conn):
                self._probation_timers[link.id] = asyncio.get_running_loop().call_later(
                    PROBATION_TIMEOUT, self._probation_expired, link.id, conn
                )
                conn.bind(link)
                return True
            targets = [lk for lk in targets if lk is not link]
        if suspects.shared and self._probation_retry is None:
            # A sibling's probation ends without telling us: look again soon.
            self._probation_retry = asyncio.get_running_loop().call_later(
                PROBATION_POLL, self._retry_suspects
            )
        return False

    def _retry_suspects(self) -> None:
        self._probation_retry = None
        self.bind_waiting()

    def rebind(self, conn: ClientConn) -> None:
        """Resume a mark whose upstream went away on another routable one, or park
        it (reading paused) until one appears, at most --connect-timeout."""
        if self._place(conn, self._routable()):
            return
        self.waiting[conn] = None
        conn.wait_for_failover(self._connect_timeout())

    def cleared(self, conn: ClientConn) -> None:
        """``conn``'s frames from a broken link were acknowledged: not a poison."""
        upstream = self._suspects.cleared(conn)
        if upstream is not None:
            self._probation_ended(upstream)

    def probation_left(self, link: UpstreamLink, conn: ClientConn) -> None:
        if self._suspects.left(link.id, conn):
            self._probation_ended(link.id)

    def probation_broke(self, link: UpstreamLink) -> None:
        if self._suspects.broke(link.id) is not None:
            self._cancel_probation_timer(link.id)

    def _probation_expired(self, upstream: str, conn: ClientConn) -> None:
        self._probation_timers.pop(upstream, None)
        if self._suspects.expired(upstream, conn):
            self.bind_waiting()

    def _probation_ended(self, upstream: str) -> None:
        """The next suspect may be resumed on ``upstream``."""
        self._cancel_probation_timer(upstream)
        self.bind_waiting()

    def _cancel_probation_timer(self, upstream: str) -> None:
        timer = self._probation_timers.pop(upstream, None)
        if timer is not None:
            timer.cancel()

    # -- link events ------------------------------------------------------------------


def _client_key(addr: str) -> bytes:
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        return addr.encode()
