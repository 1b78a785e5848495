"""Where a node's upstreams come from, and how the cluster knows the node.

The composition root holds one ``Membership`` and does not ask which:

* ``StaticMembership``: ``--upstream`` flags; nothing registered, no checker,
  SIGHUP may change the list.
* ``EtcdMembership``: the store (etcd) behind ``store.Store``; the service
  view (discovery), the session and its registration, the elected checker.

Both feed the data plane's upstream list through ``set_upstreams``. A new
source (Consul, DNS SRV, a file) is a third class with the same methods.
The order the node calls them in (node.app): ``follow`` before the
listeners, ``join`` once they are bound, ``leave`` first on stop (other
nodes take over and stop routing here before this one stops serving),
``close`` last.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from pmlb.aio import wait_event
from pmlb.cluster.checker import Checker, CheckSettings
from pmlb.cluster.discovery import ServiceView
from pmlb.cluster.registration import Registration
from pmlb.cluster.session import Session
from pmlb.observability.metrics import EtcdSample
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.keys import Keys

if TYPE_CHECKING:
    import grpc

    from pmlb.config import NodeConfig
    from pmlb.store.base import Store

# How long the node waits for the first view before listening anyway (its
# clients then wait up to --connect-timeout for an upstream).
FIRST_VIEW_WAIT = 5.0


class Membership(Protocol):
    """What the node asks of its cluster membership."""

    @property
    def source(self) -> str:
        """ "static" or "etcd", for the ready line."""

    @property
    def registered(self) -> bool:
        """Known to the cluster (always, without one): part of /readyz."""

    @property
    def session_up(self) -> bool: ...

    @property
    def checker_id(self) -> str:
        """The service's elected checker ("" without one)."""

    async def follow(self) -> bool:
        """Start feeding upstreams; whether the first list is in."""

    async def join(self, on_ready: Callable[[int], Awaitable[None]] | None) -> None:
        """Register and campaign; ``on_ready`` once registered."""

    async def leave(self) -> None: ...

    async def close(self) -> None: ...

    def reconfigure(self, config: NodeConfig, upstreams_changed: bool) -> None: ...

    def sample(self) -> EtcdSample | None: ...


class StaticMembership:
    """``--upstream`` flags: no store, nothing to join."""

    source = "static"
    registered = True
    session_up = False
    checker_id = ""

    def __init__(self, set_upstreams: Callable[[Sequence[UpstreamSpec]], None]) -> None:
        self._set = set_upstreams

    async def follow(self) -> bool:
        return True  # the node set its flags' upstreams already

    async def join(self, on_ready: Callable[[int], Awaitable[None]] | None) -> None:
        if on_ready is not None:
            await on_ready(0)

    async def leave(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def reconfigure(self, config: NodeConfig, upstreams_changed: bool) -> None:
        if upstreams_changed:
            self._set(config.upstreams)

    def sample(self) -> EtcdSample | None:
        return None


class EtcdMembership:
    """Upstreams, health and the checker from the store; the node registered
    under the session's lease (unless a supervisor registers it for its
    workers: ``entry`` None)."""

    source = "etcd"

    def __init__(
        self,
        store: Store,
        config: NodeConfig,
        set_upstreams: Callable[[Sequence[UpstreamSpec]], None],
        entry: Callable[[], dict[str, object]] | None,
        bound_host: Callable[[], str],
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.store = store
        keys = Keys(config.etcd_prefix)
        self.session = Session(store, config.lease_ttl)
        if entry is not None:
            self.session.on_new_lease(Registration(store, keys, config, entry, bound_host))
        self.view = ServiceView(store, keys, config.service, set_upstreams)
        self.checker = Checker(
            store,
            keys,
            self.session,
            self.view,
            config.node_id,
            _check_settings(config),
            credentials=credentials,
        )

    @property
    def registered(self) -> bool:
        return bool(self.session.lease)

    @property
    def session_up(self) -> bool:
        return self.session.healthy

    @property
    def checker_id(self) -> str:
        return self.view.checker

    async def follow(self) -> bool:
        await self.store.connect()
        self.view.start()
        return await wait_event(self.view.synced, FIRST_VIEW_WAIT)

    async def join(self, on_ready: Callable[[int], Awaitable[None]] | None) -> None:
        if on_ready is not None:
            self.session.on_new_lease(on_ready)
        self.session.start()  # registers at its first lease
        self.checker.start()

    async def leave(self) -> None:
        await self.checker.stop()
        await self.session.stop(revoke=True)

    async def close(self) -> None:
        # The view follows the store while the node drains (failover still
        # routes by it), so it stops only now.
        await self.view.stop()
        await self.store.close()

    def reconfigure(self, config: NodeConfig, upstreams_changed: bool) -> None:
        self.checker.settings = _check_settings(config)

    def sample(self) -> EtcdSample:
        now = time.monotonic()
        s, v, c = self.session, self.view, self.checker
        return EtcdSample(
            session_up=s.healthy,
            lease_grants=s.grants,
            keepalive_age=now - s.last_ok if s.last_ok else -1.0,
            view_resyncs=v.resyncs,
            malformed_values=v.malformed,
            watch_age=now - v.last_event if v.last_event else -1.0,
            is_checker=c.is_checker,
            health_probes=c.probes,
            health_writes=c.writes,
        )


def _check_settings(config: NodeConfig) -> CheckSettings:
    return CheckSettings(
        config.check_interval, config.check_timeout, config.check_rise, config.check_fall
    )
