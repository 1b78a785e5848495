"""A three-member etcd cluster on loopback: nodes and the CLI use every member.

Before, with several endpoints given by hostname only the first was used, and
the CLI took no etcd TLS, user or PMLB_ETCD*. Here one member is killed, then
the leadership moves between the other two: nodes keep their registration and
keep routing (including an upstream added meanwhile), and `pmlb upstream` and
`pmlb status` keep working, all through the same endpoint list.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pmlb.testing.localetcd import LocalEtcd
from tests.conftest import Cluster, etcdctl
from tests.support import free_port, run_pmlb, scrape, wait_until

PREFIX = "/pmlb-members"


@pytest.fixture
def members(tmp_path: Path) -> list[LocalEtcd]:
    peers = {f"m{i}": free_port() for i in (1, 2, 3)}
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in peers.items())
    ms = [
        LocalEtcd(name=n, peer_port=p, initial_cluster=initial, log_path=tmp_path / f"{n}.log")
        for n, p in peers.items()
    ]
    try:
        with ThreadPoolExecutor(3) as pool:  # members wait for each other's quorum
            list(pool.map(lambda m: m.start(30.0), ms))
        yield ms
    finally:
        for m in ms:
            m.stop()


def _pmlb(endpoints: str, *args: str) -> str:
    # The CLI reads the same PMLB_ETCD* variables as the node.
    r = run_pmlb(*args, env={"PMLB_ETCD": endpoints, "PMLB_ETCD_PREFIX": PREFIX})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_nodes_and_cli_survive_a_dead_member_and_a_leader_change(
    members: list[LocalEtcd], cluster: Cluster
) -> None:
    urls = ",".join(m.url for m in members)
    u1, u2, u3 = cluster.echo("u1"), cluster.echo("u2"), cluster.echo("u3")
    _pmlb(urls, "upstream", "add", "echo", "u1", u1.addr)
    nodes = [
        cluster.node([], node_id=f"n{i}", etcd=urls, prefix=PREFIX, wait_links=["u1"])
        for i in (1, 2)
    ]

    def routed(uid: str) -> bool:
        return all(scrape(n.admin).get(f'pmlb_upstream_up{{upstream="{uid}"}}') == 1 for n in nodes)

    # One member dies (SIGKILL): the others keep quorum.
    members[0].kill()
    t0 = time.monotonic()
    _pmlb(urls, "upstream", "add", "echo", "u2", u2.addr)
    wait_until(lambda: routed("u2"), 20, "u2 routed by both nodes with a member dead")
    survivors = ",".join(m.url for m in members[1:])
    # Past twice the lease TTL (3 s): the registrations were kept alive meanwhile.
    wait_until(lambda: time.monotonic() - t0 > 6.5, 10, "two lease TTLs")
    keys = etcdctl(survivors, "get", "--prefix", "--keys-only", f"{PREFIX}/nodes/")
    assert f"{PREFIX}/nodes/n1" in keys
    assert f"{PREFIX}/nodes/n2" in keys

    # Then the leadership moves from one survivor to the other.
    status = json.loads(etcdctl(survivors, "endpoint", "status", "-w", "json"))
    leader = status[0]["Status"]["leader"]
    by_id = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in status}
    follower = next(mid for mid in by_id if mid != leader)
    etcdctl(by_id[leader], "move-leader", f"{follower:x}")
    after = json.loads(etcdctl(survivors, "endpoint", "status", "-w", "json"))
    assert after[0]["Status"]["leader"] == follower, "the leader changed"

    _pmlb(urls, "upstream", "add", "echo", "u3", u3.addr)
    wait_until(lambda: routed("u3"), 20, "u3 routed after the leader change")
    report = json.loads(_pmlb(urls, "status", "--json"))
    assert sorted(n["id"] for n in report["nodes"]) == ["n1", "n2"]
    assert all(n["reachable"] for n in report["nodes"])
    for n in nodes:
        assert scrape(n.admin)["pmlb_etcd_session_up"] == 1
