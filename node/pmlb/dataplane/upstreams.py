"""The upstreams of one data plane: its links, by id, as the store or the
flags list them.

``set`` makes the link set match a list of upstream specs: new ones start,
changed ones are updated (a drain starts moving their marks off), gone ones
are retired (no new marks, the existing ones moved off at --drain-rate, the
link stopped once empty) and revived if they come back. ``routable`` is the
routing rule. Split out of dataplane.plane, which owns the marks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import Final

from pmlb.dataplane.conn import BOUND, ClientConn
from pmlb.dataplane.link import Link
from pmlb.observability.stats import NodeStats
from pmlb.protocol.domain import UpstreamSpec

log = logging.getLogger("pmlb.plane")

SERVING: Final = "SERVING"
UNKNOWN: Final = "UNKNOWN"

UpstreamLink = Link[ClientConn]


class Upstreams:
    def __init__(
        self,
        new_link: Callable[[UpstreamSpec], UpstreamLink],
        stats: NodeStats,
        drain_rate: Callable[[], float],
        changed: Callable[[], None],
    ) -> None:
        self._new_link = new_link
        self._stats = stats
        self._drain_rate = drain_rate  # --drain-rate, reloadable
        self._changed = changed  # the set or a spec changed: waiting marks may bind
        self.links: dict[str, UpstreamLink] = {}
        self._retired: list[UpstreamLink] = []
        self._migrations: dict[UpstreamLink, asyncio.Task[None]] = {}

    def all(self) -> list[UpstreamLink]:
        """Every link, the retired ones still carrying marks included."""
        return list(self.links.values()) + self._retired

    def stop_migrations(self) -> None:
        for task in list(self._migrations.values()):
            task.cancel()

    def set(self, specs: Iterable[UpstreamSpec]) -> None:
        """Make the link set match ``specs``: start new ones, update, retire gone ones."""
        wanted = {s.id: s for s in specs}
        for uid, link in list(self.links.items()):
            spec = wanted.get(uid)
            if spec is None or spec.addr != link.spec.addr:
                del self.links[uid]
                self._retire(link)
        for uid, spec in wanted.items():
            existing = self.links.get(uid)
            if existing is None and (revived := self._revive(spec)) is not None:
                existing = self.links[uid] = revived
            if existing is None:
                link = self._new_link(spec)
                self.links[uid] = link
                link.start()
                log.info(
                    "upstream %s at %s added (weight %d%s)",
                    uid,
                    spec.addr,
                    spec.weight,
                    ", draining" if spec.drain else "",
                )
            elif existing.spec != spec:
                if spec.drain and not existing.spec.drain:
                    self._migrate(existing, "upstream draining")
                log.info(
                    "upstream %s changed: weight %d -> %d, drain %s -> %s, health %s -> %s",
                    uid,
                    existing.spec.weight,
                    spec.weight,
                    existing.spec.drain,
                    spec.drain,
                    existing.spec.health,
                    spec.health,
                )
                existing.spec = spec
        self._changed()

    def _revive(self, spec: UpstreamSpec) -> UpstreamLink | None:
        """A retired link to the same upstream (id and address) that still
        carries marks, taken back into service: an upstream removed and
        re-added (an etcd restored from scratch, a hand-made mistake undone)
        keeps its marks instead of having them all moved."""
        for link in self._retired:
            if link.id == spec.id and link.spec.addr == spec.addr and not link.stopped:
                self._retired.remove(link)
                link.retired = False
                log.info(
                    "upstream %s at %s is back: its %d marks stay",
                    spec.id,
                    spec.addr,
                    len(link.marks),
                )
                return link
        return None

    def _retire(self, link: UpstreamLink) -> None:
        # No new marks go there; existing ones are moved off gradually.
        link.retired = True
        self._migrate(link, "upstream removed")
        log.info(
            "upstream %s at %s removed; %d marks stay on it until they close",
            link.id,
            link.spec.addr,
            len(link.marks),
        )
        if link.marks:
            self._retired = [lk for lk in self._retired if not lk.stopped]
            self._retired.append(link)
        else:
            link.stop()

    def routable(self) -> list[UpstreamLink]:
        """The routing rule: up, registered, not draining, and SERVING; when none
        is SERVING, those with no health entry (UNKNOWN); never NOT_SERVING.
        A link that is down is out at once (the passive check)."""
        usable = [link for link in self.links.values() if link.routable]
        serving = [link for link in usable if link.spec.health == SERVING]
        return serving or [link for link in usable if link.spec.health == UNKNOWN]

    def _migrate(self, link: UpstreamLink, why: str) -> None:
        if link in self._migrations or not link.marks:
            return
        task = asyncio.get_running_loop().create_task(self._migration(link, why))
        self._migrations[link] = task
        task.add_done_callback(lambda _t: self._migrations.pop(link, None))

    async def _migration(self, link: UpstreamLink, why: str) -> None:
        """Move marks off ``link`` at --drain-rate, jittered, so nothing stampedes."""
        total = len(link.marks)
        log.info("moving %d marks off upstream %s (%s)", total, link.id, why)
        moved = 0
        while link.marks and (link.retired or link.spec.drain):
            others = [lk for lk in self.routable() if lk is not link]
            if not others:
                # Nowhere to go: the draining upstream keeps serving them for now.
                await asyncio.sleep(1.0)
                continue
            conn = next((c for c in link.marks.values() if c.state == BOUND), None)
            if conn is None:  # only moves in flight: wait for their acknowledgements
                await asyncio.sleep(0.05)
                continue
            conn.start_move(why)
            self._stats.moves += 1
            moved += 1
            await asyncio.sleep(random.uniform(0.5, 1.5) / self._drain_rate())
        log.info("upstream %s: %d marks moved (%s)", link.id, moved, why)
