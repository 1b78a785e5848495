"""The CoreDNS records a node publishes (etcd plugin keys): the key is the
name's labels reversed under --dns-prefix, ending in the node id; the value
is ``{"host": <the address clients reach>, "ttl": <--lease-ttl>}``, the
listener's address unless --dns-address says otherwise, under the node's
lease."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Cluster, Etcd
from tests.support import wait_until


@pytest.mark.parametrize(
    ("extra", "published"),
    [([], "127.0.0.7"), (["--dns-address", "127.0.0.9"], "127.0.0.9")],
    ids=["listener", "dns-address"],
)
def test_the_record_names_the_node_and_its_address(
    etcd: Etcd, cluster: Cluster, extra: list[str], published: str
) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    sky = f"/skydns{etcd.prefix}"
    node = cluster.node(
        [],
        node_id="dns1",
        etcd=etcd.url,
        prefix=etcd.prefix,
        host="127.0.0.7",
        wait_links=["u1"],
        extra=["--dns-name", "LB.Example.test.", "--dns-prefix", sky, *extra],
    )
    key = f"{sky}/test/example/lb/dns1"

    def record() -> str:  # outside the suite's prefix: read the key as CoreDNS does
        return etcd.ctl("get", key, "--print-value-only").strip()

    wait_until(lambda: record() != "", 10, "the record")
    value = json.loads(record())
    assert value == {"host": published, "ttl": 3}, value  # the suite's --lease-ttl 3
    lease = etcd.ctl("get", key, "-w", "json")
    assert '"lease"' in lease, "under the node's lease: it goes when the node does"
    node.proc.stop()
    wait_until(lambda: record() == "", 10, "the record removed at a clean stop")
