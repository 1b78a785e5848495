"""A node's entry in etcd, ``<prefix>/nodes/<node id>``, and its DNS record.

Written under the node's session lease each time a lease is granted, so it
lives exactly as long as the node keeps the lease. The process that writes it
is the node's face to the cluster: a node of one process writes it itself; a
node of several workers has its supervisor write it (pmlb.node.workers), once, for
all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pmlb import __version__
from pmlb.cluster.dns import advertised_host, advertised_ip, skydns_key, skydns_value
from pmlb.config import NodeConfig
from pmlb.protocol.domain import format_hostport
from pmlb.store.base import Store
from pmlb.store.keys import Keys, format_node

log = logging.getLogger("pmlb.registration")


def node_entry(
    config: NodeConfig,
    listen: Sequence[tuple[str, int]],
    control_port: int,
    admin: tuple[str, int] | None,
    started_at: str,
    workers: int = 1,
) -> dict[str, Any]:
    """The JSON value of the node's key: addresses others dial (never a
    wildcard bind address, see --advertise)."""

    def reach(host: str, port: int) -> str:
        return format_hostport(advertised_host(host, config.advertise, config.etcd), port)

    control = reach(config.control[0], control_port) if config.control else ""
    entry: dict[str, Any] = {
        "listen": [reach(h, p) for h, p in listen],
        "control": control,
        "admin": reach(*admin) if admin else "",
        "services": [config.service],
        "version": __version__,
        "started_at": started_at,
    }
    if workers > 1:
        # Every worker serves the node's one control address and hands a call
        # for a sibling's mark to it (the mark names its worker, pmlb.protocol.ids).
        entry["workers"] = [{"index": i, "control": control} for i in range(workers)]
    return entry


class Registration:
    """The ``on_new_lease`` callback of the session that carries the node."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        config: NodeConfig,
        entry: Callable[[], dict[str, Any]],
        bind_host: Callable[[], str],
    ) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self.entry = entry
        self.bind_host = bind_host
        if config.dns_name:  # fail at start-up, not at the first registration
            skydns_key(config.dns_prefix, config.dns_name, config.node_id)
            if config.dns_address or config.advertise:
                advertised_ip(config.advertise or config.listen[0][0], config.dns_address)

    async def __call__(self, lease: int) -> None:
        cfg = self.config
        key = self.keys.node(cfg.node_id)
        await self.store.put(key, format_node(self.entry()), lease=lease)
        log.info("registered %s under lease %x", key, lease)
        if cfg.dns_name:
            host = advertised_host(self.bind_host(), cfg.advertise, cfg.etcd)
            ip = advertised_ip(host, cfg.dns_address)
            record = skydns_key(cfg.dns_prefix, cfg.dns_name, cfg.node_id)
            await self.store.put(record, skydns_value(ip, cfg.lease_ttl), lease=lease)
            log.info("published %s -> %s (%s) under the same lease", cfg.dns_name, ip, record)
