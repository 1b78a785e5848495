"""Checker election and active health checking, one checker per service.

Election: every node serving the service campaigns by creating
``<prefix>/services/<svc>/checker`` = its node id, under its session lease,
in a transaction that succeeds only if the key does not exist. The winner is
the checker until its lease ends (crash: within the TTL) or it resigns
(clean shutdown: it deletes the key if it still holds it, so another node
takes over at once). Losers wait for the key to change, then campaign again.

Checking: the checker probes every upstream with grpc.health.v1 Health/Check
(service "pmlb.v1.Upstream") every ``interval``, each probe bounded by
``timeout``. A first result is written at once; after that a status flips
only after ``rise`` consecutive successes or ``fall`` consecutive failures.
Only transitions are written, to ``.../health/<id>``, under the checker's
lease, so they vanish with it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from pmlb.aio import stop_task, supervised, wait_event
from pmlb.cluster.discovery import ServiceView
from pmlb.cluster.session import Session
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.base import Store, StoreError
from pmlb.store.keys import NOT_SERVING, SERVING, Health, Keys, format_health, now_rfc3339
from pmlb.transport import HEALTH_SERVICE
from pmlb.transport.cgrpc import check_health

log = logging.getLogger("pmlb.checker")


@dataclass(frozen=True, slots=True)
class CheckSettings:
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(slots=True)
class _Probe:
    addr: str
    channel: grpc.aio.Channel
    status: str = ""
    streak: int = 0  # consecutive results that disagree with ``status``
    # Written in this term: until then the view's copy of the health key may
    # be stale (a key under a lease that has ended, or from an etcd that was
    # replaced), so the first result of a term is always written.
    written: bool = False


class Checker:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        session: Session,
        view: ServiceView,
        node_id: str,
        settings: CheckSettings,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.credentials = credentials  # the same TLS the links use
        self.store = store
        self.keys = keys
        self.session = session
        self.view = view
        self.node_id = node_id
        self.settings = settings
        self.is_checker = False
        self.terms = 0
        self.writes = 0
        self._probes: dict[str, _Probe] = {}
        self.probes = 0  # health checks sent (pmlb_health_probes_total)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            supervised(f"checker-{self.view.service}", self._run), name="checker"
        )

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, "checker")
        await self.resign()
        for p in self._probes.values():
            await p.channel.close(grace=None)
        self._probes.clear()

    async def resign(self) -> None:
        """Give the checker role back at once (clean shutdown, drain)."""
        if self.is_checker:
            self.is_checker = False
            try:
                key = self.keys.checker(self.view.service)
                if await self.store.delete_if_value(key, self.node_id, deadline=1.5):
                    log.info("resigned as checker of %s", self.view.service)
            except StoreError as exc:
                log.warning("could not resign as checker: %s (the lease will end it)", exc)

    async def _run(self) -> None:
        key = self.keys.checker(self.view.service)
        while True:
            lease = self.session.lease
            if not lease or not self.session.healthy:
                # Wait for the session to change (not for checker_changed: it
                # may be set already, and this loop would spin).
                self.session.changed.clear()
                if not self.session.lease or not self.session.healthy:
                    await wait_event(self.session.changed, self.settings.interval)
                continue
            try:
                won = await self.store.put_if_absent(key, self.node_id, lease)
            except StoreError as exc:
                log.debug("campaign failed: %s", exc)
                self.view.checker_changed.clear()  # retry after the interval, not in a spin
                await self._wait_change(self.settings.interval)
                continue
            if not won:
                # Someone holds it; wait for the key to change (or a periodic retry).
                self.view.checker_changed.clear()
                await self._wait_change(max(self.settings.interval, self.session.ttl / 2))
                continue
            self.is_checker = True
            self.terms += 1
            log.info("elected checker of service %s (term %d)", self.view.service, self.terms)
            try:
                await self._check_while_leader(key, lease)
            finally:
                self.is_checker = False
                self._forget_states()
            log.warning("no longer checker of service %s", self.view.service)

    async def _wait_change(self, timeout: float) -> None:
        await wait_event(self.view.checker_changed, timeout)

    async def _check_while_leader(self, key: str, lease: int) -> None:
        while self.session.lease == lease:
            if self.view.checker and self.view.checker != self.node_id:
                return  # our key is gone (lease expired) and someone else won
            started = asyncio.get_running_loop().time()
            ups = list(self.view.upstreams.values())
            results = await asyncio.gather(*(self._probe(u) for u in ups))
            for spec, (ok, detail) in zip(ups, results, strict=True):
                await self._record(spec, ok, detail, lease)
            for gone in set(self._probes) - {u.id for u in ups}:
                await self._probes.pop(gone).channel.close(grace=None)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self.settings.interval - elapsed))

    def _forget_states(self) -> None:
        for p in self._probes.values():
            p.status, p.streak, p.written = "", 0, False

    async def _probe(self, spec: UpstreamSpec) -> tuple[bool, str]:
        probe = self._probes.get(spec.id)
        if probe is None or probe.addr != spec.addr:
            if probe is not None:
                await probe.channel.close(grace=None)
            channel = (
                grpc.aio.secure_channel(spec.addr, self.credentials)
                if self.credentials is not None
                else grpc.aio.insecure_channel(spec.addr)
            )
            probe = _Probe(spec.addr, channel)
            self._probes[spec.id] = probe
        self.probes += 1
        return await check_health(probe.channel, HEALTH_SERVICE, self.settings.timeout)

    async def _record(self, spec: UpstreamSpec, ok: bool, detail: str, lease: int) -> None:
        probe = self._probes[spec.id]
        observed = SERVING if ok else NOT_SERVING
        if probe.status == observed:
            probe.streak = 0
            return
        if probe.status:  # a flip needs rise/fall consecutive results
            probe.streak += 1
            needed = self.settings.rise if ok else self.settings.fall
            if probe.streak < needed:
                return
        probe.status, probe.streak = observed, 0
        current = self.view.health.get(spec.id)
        if (
            probe.written
            and current is not None
            and current.status == observed
            and current.checker == self.node_id
        ):
            return  # already written this term (e.g. a watch echo after a resync)
        health = Health(observed, now_rfc3339(), self.node_id, detail)
        try:
            await self.store.put(
                self.keys.health(self.view.service, spec.id), format_health(health), lease=lease
            )
            self.writes += 1
            probe.written = True
            log.info("upstream %s (%s) is %s: %s", spec.id, spec.addr, observed, detail)
        except StoreError as exc:
            probe.status = ""  # write again next round
            log.warning("could not write health of %s: %s", spec.id, exc)
