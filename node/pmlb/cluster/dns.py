"""DNS membership that follows etcd: round-robin A records for live nodes only.

Two ways, both driven by the node's lease, so a node that dies or drains
leaves DNS within its TTL (dies) or at once (drains: the lease is revoked):

* CoreDNS's etcd plugin: with ``--dns-name lb.example.com`` each node writes
  ``/skydns/com/example/lb/<node id>`` = ``{"host": "<ip>", "ttl": <s>}``
  under its lease (the SkyDNS key format that plugin serves).
* ``pmlb dns-sync --hosts-file FILE --name lb.example.com``: watches
  ``/pmlb/nodes/`` and keeps a hosts file of the live nodes' addresses for
  dnsmasq (``--addn-hosts=FILE``), sending dnsmasq SIGHUP so it re-reads it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from pmlb.errors import ConfigError
from pmlb.protocol.domain import parse_hostport
from pmlb.store.base import KV, Event, Store
from pmlb.store.keys import InvalidValue, Keys, parse_node
from pmlb.store.listwatch import list_and_watch

log = logging.getLogger("pmlb.dns")


def skydns_key(prefix: str, name: str, node_id: str) -> str:
    """``lb.example.com`` -> ``/skydns/com/example/lb/<node id>``."""
    labels = [p for p in name.strip(".").lower().split(".") if p]
    if not labels:
        raise ConfigError(f"--dns-name {name!r} is not a DNS name")
    return "/".join([prefix.rstrip("/"), *reversed(labels), node_id])


def skydns_value(ip: str, ttl: int) -> str:
    return json.dumps({"host": ip, "ttl": ttl})


def advertised_ip(listen_host: str, override: str | None) -> str:
    """The address other machines reach this node at."""
    host = override or listen_host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"DNS address {host!r} is not an IP address (set --dns-address)"
        ) from None
    if addr.is_unspecified:
        raise ConfigError("the node listens on all addresses: set --dns-address to publish one")
    return str(addr)


def local_address_towards(url: str) -> str | None:
    """The local IP this machine uses to reach ``url``'s host (an etcd endpoint).

    A UDP socket is "connected" (which sends nothing) and asked for its own
    address: the kernel's routing choice, so etcd on loopback gives loopback.
    None when the host does not resolve or is unreachable."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host, port = parsed.hostname, parsed.port or 2379
    if not host:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except OSError:
        return None


def advertised_host(bind_host: str, advertise: str | None, etcd: Sequence[str]) -> str:
    """The host to register for an address bound on ``bind_host``: ``--advertise``
    when given; the bind host when it is a specific address; for a wildcard
    bind, the local address towards the first etcd endpoint that answers the
    routing question, else the machine's host name."""
    if advertise:
        return advertise
    try:
        wildcard = ipaddress.ip_address(bind_host).is_unspecified
    except ValueError:
        return bind_host  # a host name: registered as given
    if not wildcard:
        return bind_host
    for endpoint in etcd:
        local = local_address_towards(endpoint)
        if local is not None:
            return local
    return socket.gethostname()


def node_addresses(infos: dict[str, dict[str, object]], service: str | None) -> list[str]:
    """Sorted unique IPs the live nodes listen on (optionally for one service)."""
    ips: set[str] = set()
    for info in infos.values():
        services = info.get("services")
        if service and (not isinstance(services, list) or service not in services):
            continue
        listen = info.get("listen")
        if not isinstance(listen, list):
            continue
        for item in listen:
            try:
                host, _ = parse_hostport(str(item))
                if not ipaddress.ip_address(host).is_unspecified:
                    ips.add(host)
            except (ConfigError, ValueError):
                continue
    return sorted(ips, key=lambda ip: ipaddress.ip_address(ip).packed)


class HostsFileSync:
    """Keeps ``hosts_file`` equal to the live nodes' addresses for ``name``."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        hosts_file: Path,
        name: str,
        service: str | None,
        dnsmasq_pid: int | None,
        dnsmasq_pidfile: Path | None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.hosts_file = hosts_file
        self.name = name
        self.service = service
        self.dnsmasq_pid = dnsmasq_pid
        self.dnsmasq_pidfile = dnsmasq_pidfile
        self.infos: dict[str, dict[str, object]] = {}
        self.written = ""
        self.writes = 0

    async def run(self) -> None:
        await list_and_watch(
            self.store,
            self.keys.nodes(),
            self._listed,
            self._apply,
            log,
            f"keeping {self.hosts_file} as it is",
        )

    def _listed(self, revision: int, kvs: list[KV]) -> None:
        self.infos = {}
        for kv in kvs:
            self._put(kv.key, kv.value, kv.lease)
        self._write()

    def _apply(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "put":
                self._put(ev.key, ev.value, ev.lease)
            else:
                self.infos.pop(ev.key, None)
        self._write()

    def _put(self, key: str, value: bytes, lease: int) -> None:
        self.infos.pop(key, None)
        if not lease:
            # Nodes register under their session's lease, so the key goes when
            # the node does. A key without one was written by hand (or by
            # someone else) and would stay in DNS for ever: not a live node.
            log.warning("ignoring %s: no lease, so not a live node's registration", key)
            return
        try:
            node_id = Keys.leaf(self.keys.nodes(), key)
            self.infos[key] = parse_node(node_id, value)
        except InvalidValue as exc:
            log.warning("ignoring %s: %s", key, exc)

    def _write(self) -> None:
        ips = node_addresses(self.infos, self.service)
        text = "# written by pmlb dns-sync from etcd; do not edit\n" + "".join(
            f"{ip} {self.name}\n" for ip in ips
        )
        if text == self.written:
            return
        tmp = self.hosts_file.with_name(self.hosts_file.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.hosts_file)  # atomic: dnsmasq never reads half a file
        self.written = text
        self.writes += 1
        log.info("%s: %s -> %s", self.hosts_file, self.name, ", ".join(ips) or "(no nodes)")
        self._reload()

    def _reload(self) -> None:
        pid = self.dnsmasq_pid
        if pid is None and self.dnsmasq_pidfile is not None:
            try:
                pid = int(self.dnsmasq_pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                log.warning("cannot read dnsmasq pid from %s", self.dnsmasq_pidfile)
                return
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGHUP)  # dnsmasq re-reads its hosts files
        except ProcessLookupError:
            log.warning("dnsmasq (pid %d) is not running", pid)
