"""The service view: upstreams, their health and the checker, from etcd.

One list-then-watch loop per service over ``<prefix>/services/<svc>/``: list
everything at revision R, then watch from R+1. On compaction, a cancelled
watch, a broken stream or a replaced cluster it lists again
(``store.listwatch``, with backoff).
While etcd is unreachable the last view stays in force (static stability).

A malformed value is logged and counted, and that key is ignored; the rest
of the view carries on. The view calls ``on_change`` with the routable-ready
upstream list (health folded into each spec) whenever it changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from pmlb.aio import stop_task, supervised
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.base import KV, Event, Store
from pmlb.store.keys import UNKNOWN, Health, InvalidValue, Keys, parse_health, parse_upstream
from pmlb.store.listwatch import list_and_watch

log = logging.getLogger("pmlb.discovery")


class ServiceView:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        service: str,
        on_change: Callable[[list[UpstreamSpec]], None],
    ) -> None:
        self.store = store
        self.keys = keys
        self.service = service
        self.on_change = on_change
        self.upstreams: dict[str, UpstreamSpec] = {}
        self.health: dict[str, Health] = {}
        self.checker = ""
        self.checker_changed = asyncio.Event()
        self.malformed = 0
        self.resyncs = 0
        self.revision = 0
        self.synced = asyncio.Event()
        self.last_event = 0.0
        self._raw: dict[str, bytes] = {}
        self._last_pushed: list[UpstreamSpec] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            supervised(f"discovery-{self.service}", self._run), name=f"view-{self.service}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, f"discovery of {self.service}")

    def specs(self) -> list[UpstreamSpec]:
        out = []
        for uid, spec in sorted(self.upstreams.items()):
            h = self.health.get(uid)
            out.append(dataclasses.replace(spec, health=h.status if h else UNKNOWN))
        return out

    async def _run(self) -> None:
        await list_and_watch(
            self.store,
            self.keys.service(self.service),
            self._listed,
            self._apply,
            log,
            "keeping the last view",
        )

    def _listed(self, revision: int, kvs: list[KV]) -> None:
        self._raw = {kv.key: kv.value for kv in kvs}
        self._rebuild()
        self.revision = revision
        self.resyncs += 1
        self.synced.set()
        log.info(
            "service %s: listed %d keys at revision %d: %d upstreams, checker %r",
            self.service,
            len(kvs),
            revision,
            len(self.upstreams),
            self.checker or "-",
        )

    def _apply(self, events: list[Event]) -> None:
        self.last_event = time.monotonic()
        for ev in events:
            if ev.kind == "put":
                self._raw[ev.key] = ev.value
            else:
                self._raw.pop(ev.key, None)
        self._rebuild()

    def _rebuild(self) -> None:
        ups: dict[str, UpstreamSpec] = {}
        health: dict[str, Health] = {}
        checker = ""
        up_prefix = self.keys.upstreams(self.service)
        h_prefix = self.keys.healths(self.service)
        checker_key = self.keys.checker(self.service)
        bad = 0
        for key, value in self._raw.items():
            try:
                if key.startswith(up_prefix):
                    uid = Keys.leaf(up_prefix, key)
                    ups[uid] = parse_upstream(uid, value)
                elif key.startswith(h_prefix):
                    uid = Keys.leaf(h_prefix, key)
                    health[uid] = parse_health(uid, value)
                elif key == checker_key:
                    checker = value.decode("utf-8", errors="replace")
            except InvalidValue as exc:
                bad += 1
                if self._warned(key, value):
                    log.warning("ignoring %s: %s", key, exc)
        self.malformed = bad
        self.upstreams, self.health = ups, health
        if checker != self.checker:
            log.info("service %s: checker is now %r", self.service, checker or "-")
            self.checker = checker
            self.checker_changed.set()
        specs = self.specs()
        if specs != self._last_pushed:
            self._last_pushed = specs
            self.on_change(specs)

    _warned_keys: dict[str, bytes]

    def _warned(self, key: str, value: bytes) -> bool:
        """Log a malformed key once per value, not on every rebuild."""
        seen = self.__dict__.setdefault("_warned_keys", {})
        if seen.get(key) == value:
            return False
        seen[key] = value
        return True
