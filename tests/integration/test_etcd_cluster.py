"""etcd coordination with a real etcd, real nodes and real upstream processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from pmlb.protocol.ids import worker_of
from pmlb.testing.localetcd import LocalEtcd
from tests.certs import make_chain
from tests.conftest import CHECK_INTERVAL, LEASE_TTL, Cluster, Etcd, Node, both_transports
from tests.faults.report import record
from tests.support import wait_until


def who(node: Node, msg: bytes = b"who") -> tuple[str, str]:
    """One short connection: (mark, upstream id) of the reply."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(msg + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    mark, upstream, _ = data.decode().split(" ", 2)
    return mark, upstream


def routes(node: Node, n: int = 8) -> set[str]:
    return {who(node)[1] for _ in range(n)}


@both_transports
def test_put_routes_on_every_node_and_ops_follow(etcd: Etcd, cluster: Cluster) -> None:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    nodes = [
        cluster.node([], node_id=f"n{i}", etcd=etcd.url, prefix=etcd.prefix, wait_links=[])
        for i in (1, 2)
    ]

    t0 = time.monotonic()
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    for node in nodes:
        wait_until(lambda node=node: routes(node, 1) == {"u1"}, 10, "u1 routed")
    print(f"put -> first routed mark on both nodes: {time.monotonic() - t0:.3f}s")

    etcd.put("/services/echo/upstreams/u2", json.dumps({"addr": u2.addr, "weight": 3}))
    for node in nodes:
        wait_until(lambda node=node: routes(node) == {"u1", "u2"}, 10, "both routed")

    # drain u1 with the CLI: no new marks there
    etcd.pmlb("upstream", "drain", "echo", "u1")
    for node in nodes:
        wait_until(lambda node=node: routes(node) == {"u2"}, 10, "drained u1 gets no marks")

    # reweight: u1 back, weight 1 vs 3 -> u2 gets three in four. Each worker
    # of a node runs its own smooth weighted round-robin, exact over its own
    # picks (the kernel spreads connections over the workers): per worker,
    # u1 gets n/4 of n, rounded either way.
    etcd.put("/services/echo/upstreams/u1", json.dumps({"addr": u1.addr, "weight": 1}))
    wait_until(
        lambda: nodes[0].metrics().get('pmlb_upstream_routable{upstream="u1"}') == 1,
        10,
        "u1 undrained on every worker",
    )
    per_worker: dict[int | None, dict[str, int]] = {}
    for _ in range(40):
        mark, upstream = who(nodes[0])
        counts = per_worker.setdefault(worker_of(mark), {"u1": 0, "u2": 0})
        counts[upstream] += 1
    for counts in per_worker.values():
        n = counts["u1"] + counts["u2"]
        assert counts["u1"] in (n // 4, -(-n // 4)), per_worker
    assert sum(c["u1"] for c in per_worker.values()) in range(
        10 - len(per_worker), 11 + len(per_worker)
    )

    etcd.delete("/services/echo/upstreams/u2")
    for node in nodes:
        wait_until(lambda node=node: routes(node) == {"u1"}, 10, "deleted u2 gets no marks")

    out = etcd.pmlb("upstream", "ls", "echo", "--json")
    listed = json.loads(out)
    assert [u["id"] for u in listed["upstreams"]] == ["u1"]
    assert listed["checker"] in ("n1", "n2")
    assert set(etcd.keys("/nodes/")) == {etcd.prefix + "/nodes/n1", etcd.prefix + "/nodes/n2"}


@pytest.mark.asyncio
@both_transports
async def test_not_serving_is_routed_around_and_back(etcd: Etcd, cluster: Cluster) -> None:
    from pmlb.upstream import Conn, Handler, UpstreamServer

    class Echo(Handler):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_message(self, conn: Conn, data: bytes) -> None:
            conn.send(f"{conn.mark} {self.name} ".encode() + data)

    servers = {}
    for name in ("a", "b"):
        servers[name] = UpstreamServer(Echo(name), upstream_id=name, listen="127.0.0.1:0")
        port = await servers[name].start()
        etcd.put(f"/services/echo/upstreams/{name}", f"127.0.0.1:{port}")
    try:
        nodes = [
            await asyncio.to_thread(
                cluster.node,
                [],
                node_id=f"n{i}",
                etcd=etcd.url,
                prefix=etcd.prefix,
                wait_links=["a", "b"],
            )
            for i in (1, 2)
        ]

        async def all_route(expected: set[str]) -> None:
            for node in nodes:
                await asyncio.to_thread(
                    wait_until,
                    lambda node=node: routes(node) == expected,
                    10,
                    f"routing to {expected}",
                )

        await all_route({"a", "b"})
        await servers["a"].set_serving(False)
        await asyncio.to_thread(
            wait_until,
            lambda: '"NOT_SERVING"' in (etcd.get("/services/echo/health/a") or ""),
            10,
            "checker writes NOT_SERVING",
        )
        await all_route({"b"})
        await servers["a"].set_serving(True)
        await all_route({"a", "b"})
    finally:
        for s in servers.values():
            await s.stop(0)


def test_checker_and_node_death(etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    nodes = {
        f"n{i}": cluster.node(
            [], node_id=f"n{i}", etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"]
        )
        for i in (1, 2, 3)
    }
    wait_until(lambda: etcd.get("/services/echo/checker") in nodes, 10, "a checker")
    first = etcd.get("/services/echo/checker")
    assert first is not None
    wait_until(
        lambda: f'"checker": "{first}"' in (etcd.get("/services/echo/health/u1") or ""),
        10,
        "health written by the checker",
    )

    t0 = time.monotonic()
    nodes[first].proc.kill()
    # The dead checker's lease expires (LEASE_TTL), a survivor's next check
    # interval takes the key; LEASE_TTL more of slack for a loaded machine.
    bound = LEASE_TTL + CHECK_INTERVAL + LEASE_TTL
    wait_until(lambda: etcd.get("/services/echo/checker") not in (None, first), 10, "a new checker")
    took = time.monotonic() - t0
    second = etcd.get("/services/echo/checker")
    assert took < bound, f"takeover took {took:.1f}s"
    wait_until(
        lambda: f'"checker": "{second}"' in (etcd.get("/services/echo/health/u1") or ""),
        10,
        "the dead checker's health keys replaced by the new checker's",
    )
    # Its entry goes with its lease (TTL 3 s); the checker may move sooner: a
    # node of several workers whose supervisor is killed has its workers drain
    # and resign at once (PR_SET_PDEATHSIG).
    wait_until(
        lambda: etcd.prefix + f"/nodes/{first}" not in etcd.keys("/nodes/"),
        3 + 3,
        "dead node unregistered within its lease TTL",
    )

    # clean stop: the checker resigns and the lease is revoked at once
    t0 = time.monotonic()
    assert second is not None
    assert nodes[second].proc.stop() == 0
    wait_until(
        lambda: etcd.get("/services/echo/checker") not in (None, second),
        2.5,
        "immediate takeover after a clean stop",
    )
    assert etcd.prefix + f"/nodes/{second}" not in etcd.keys("/nodes/")
    print(f"takeover after SIGKILL {took:.2f}s, after SIGTERM {time.monotonic() - t0:.2f}s")
    record(
        "checker node SIGKILL (lease TTL 3 s)",
        recovery_s=round(took, 2),
        note="new checker elected; dead node's keys gone",
    )
    record(
        "checker node SIGTERM (resigns)",
        recovery_s=round(time.monotonic() - t0, 2),
        note="takeover at once",
    )


def test_bad_values_are_ignored_and_counted(etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    node = cluster.node([], etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
    etcd.put("/services/echo/upstreams/bad1", "not an address")
    etcd.put("/services/echo/upstreams/bad2", '{"addr": "127.0.0.1:1", "weight": "heavy"}')
    etcd.put("/services/echo/upstreams/bad3", '{"addr": ')
    etcd.put("/services/echo/health/ghost", "bogus")
    # a non-UTF-8 key, written through the API etcdctl cannot type
    asyncio.run(_put_raw(etcd, b"/services/echo/upstreams/\xff\xfe", b"127.0.0.1:2"))
    wait_until(
        lambda: node.metrics().get("pmlb_etcd_malformed_values") == 5,
        10,
        "five malformed values counted",
    )
    assert routes(node) == {"u1"}
    log = node.proc.log()
    assert "'not an address'" in log or "not an address" in log
    assert "'weight' must be an integer" in log
    assert node.proc.alive()


async def _put_raw(etcd: Etcd, key: bytes, value: bytes) -> None:
    from pmlb.store.etcd import EtcdSettings, EtcdStore

    store = EtcdStore(EtcdSettings(endpoints=(etcd.url,)))
    await store.connect()
    assert store._kv is not None
    from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2 as rpc

    await store._kv.Put(rpc.PutRequest(key=etcd.prefix.encode() + key, value=value))
    await store.close()


@pytest.mark.slow
def test_static_stability_through_etcd_stop_and_replacement(etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    nodes = [
        cluster.node([], node_id=f"n{i}", etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
        for i in (1, 2)
    ]
    held = []
    for node in nodes:
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        held.append(s)

    def still_working(tag: str, routed: frozenset[str] = frozenset({"u1"})) -> None:
        for i, s in enumerate(held):
            s.sendall(f"{tag}-{i}\n".encode())
            line = s.recv(4096).decode()
            assert line.endswith(f" u1 {tag}-{i}\n"), line
        for node in nodes:
            assert routes(node, 2 * len(routed)) == routed, "new connections are still routed"

    still_working("before")
    etcd.server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            still_working("frozen")
            time.sleep(1)
        for node in nodes:
            assert node.metrics()["pmlb_etcd_session_up"] == 0, "degraded is visible"
    finally:
        etcd.server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    still_working("thawed")
    for node in nodes:
        wait_until(
            lambda node=node: node.metrics()["pmlb_etcd_session_up"] == 1, 15, "session back"
        )

    # etcd killed and replaced by an empty one on the same address
    etcd.server.kill()
    still_working("dead")
    etcd.server.start(fresh=True)
    still_working("fresh")
    wait_until(lambda: len(etcd.keys("/nodes/")) == 2, 20, "both nodes re-registered")
    etcd.put("/services/echo/upstreams/u1", u1.addr)  # the operator restores the config
    u2 = cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u2", u2.addr)
    for node in nodes:
        wait_until(
            lambda node=node: routes(node) == {"u1", "u2"},
            15,
            "the fresh cluster's config is followed",
        )
    still_working("after", frozenset({"u1", "u2"}))
    for s in held:
        s.close()


def test_etcd_with_authentication(etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.ctl("user", "add", "root:rootpw")
    etcd.ctl("user", "add", "pmlb:s3cret-pw")
    etcd.ctl("role", "add", "pmlb")
    etcd.ctl("role", "grant-permission", "pmlb", "--prefix=true", "readwrite", etcd.prefix + "/")
    etcd.ctl("user", "grant-role", "pmlb", "pmlb")
    etcd.ctl("auth", "enable")
    etcd.ctl("--user", "root:rootpw", "put", etcd.prefix + "/services/echo/upstreams/u1", u1.addr)
    node = cluster.node(
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1"],
        extra=["--etcd-user", "pmlb"],
        env={"PMLB_ETCD_PASSWORD": "s3cret-pw"},
    )
    assert routes(node) == {"u1"}
    wait_until(lambda: node.metrics().get("pmlb_etcd_session_up") == 1, 10, "session up")
    keys = etcd.ctl(
        "--user", "root:rootpw", "get", "--prefix", "--keys-only", etcd.prefix + "/nodes/"
    )
    assert f"{etcd.prefix}/nodes/n1" in keys
    assert "s3cret-pw" not in node.proc.log(), "no secret in logs"


def test_etcd_over_mutual_tls(tmp_path: Path, cluster: Cluster) -> None:
    chain = make_chain(tmp_path / "certs")
    server = LocalEtcd(
        log_path=tmp_path / "etcd-tls.log",
        tls=(str(chain.ca), str(chain.server_cert), str(chain.server_key)),
    )
    server.start()
    try:
        u1 = cluster.echo("u1")
        tls_args = [
            "--cacert",
            str(chain.ca),
            "--cert",
            str(chain.client_cert),
            "--key",
            str(chain.client_key),
        ]
        etcd = Etcd(server, "/pmlb-tls")
        etcd.ctl(*tls_args, "put", "/pmlb-tls/services/echo/upstreams/u1", u1.addr)
        node = cluster.node(
            [],
            etcd=server.url,
            prefix="/pmlb-tls",
            wait_links=["u1"],
            extra=[
                "--etcd-ca",
                str(chain.ca),
                "--etcd-cert",
                str(chain.client_cert),
                "--etcd-key",
                str(chain.client_key),
            ],
        )
        assert server.url.startswith("https://")
        assert routes(node) == {"u1"}
        keys = etcd.ctl(*tls_args, "get", "--prefix", "--keys-only", "/pmlb-tls/nodes/")
        assert "/pmlb-tls/nodes/n1" in keys
        cluster.stop()
    finally:
        server.stop()
