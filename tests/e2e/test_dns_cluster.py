"""Several nodes behind round-robin DNS (real dnsmasq, fed by `pmlb dns-sync`)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import dns.resolver

from tests.conftest import Cluster, Etcd
from tests.faults.report import record
from tests.support import Proc, free_port, needs, wait_until

NAME = "lb.pmlb.test"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

# A developer machine without dnsmasq skips with this reason; under .ci/run a
# missing dnsmasq fails the run (tests/support.needs).
pytestmark = needs(
    None
    if shutil.which("dnsmasq") or Path("/usr/sbin/dnsmasq").exists()
    else "dnsmasq is not installed: apt-get install dnsmasq-base (.ci/run does)"
)


def common_port() -> int:
    while True:
        port = free_port()
        ok = True
        for host in HOSTS:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port


class Dns:
    def __init__(self, tmp: Path, etcd: Etcd, cluster: Cluster) -> None:
        self.hosts = tmp / "pmlb.hosts"
        self.hosts.write_text("")
        self.pidfile = tmp / "dnsmasq.pid"
        self.port = free_port()
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.proc = subprocess.Popen(
            [
                dnsmasq,
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                f"--port={self.port}",
                f"--pid-file={self.pidfile}",
                "--user=root",
                "--local-ttl=0",
                "--log-facility=-",
            ],
            stdout=(tmp / "dnsmasq.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), 10, "dnsmasq up"
        )
        self.sync = Proc(
            "dns-sync",
            [
                "dns-sync",
                "--etcd",
                etcd.url,
                "--etcd-prefix",
                etcd.prefix,
                "--hosts-file",
                str(self.hosts),
                "--name",
                NAME,
                "--dnsmasq-pidfile",
                str(self.pidfile),
            ],
            tmp,
        )
        cluster.procs.append(self.sync)
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = ["127.0.0.1"]
        self.resolver.port = self.port
        self.resolver.lifetime = 2.0

    def lookup(self) -> list[str]:
        try:
            return [r.address for r in self.resolver.resolve(NAME, "A")]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def converse(dns_: Dns, port: int) -> tuple[socket.socket, str, str]:
    """Resolve the name, connect to the first address, learn the mark."""
    ip = dns_.lookup()[0]
    s = socket.create_connection((ip, port), timeout=10)
    s.sendall(b"hi\n")
    mark = s.recv(200).decode().split(" ")[0]
    return s, ip, mark


def test_round_robin_dns_follows_the_cluster(tmp_path: Path, etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    port = common_port()
    nodes = {
        host: cluster.node(
            [],
            node_id=f"n{i}",
            etcd=etcd.url,
            prefix=etcd.prefix,
            host=host,
            port=port,
            wait_links=["u1"],
            extra=["--dns-name", NAME, "--dns-prefix", etcd.prefix + "/skydns"],
        )
        for i, host in enumerate(HOSTS, start=2)
    }
    dns_ = Dns(tmp_path, etcd, cluster)
    try:
        wait_until(lambda: sorted(dns_.lookup()) == sorted(HOSTS), 10, "all nodes in DNS")
        # The CoreDNS etcd-plugin keys are there too, under each node's lease.
        sky = etcd.keys("/skydns/")
        assert sorted(k.rsplit("/", 1)[1] for k in sky) == ["n2", "n3", "n4"]
        assert all("/skydns/test/pmlb/lb/" in k for k in sky)

        clients = [converse(dns_, port) for _ in range(300)]
        spread = Counter(ip for _, ip, _ in clients)
        assert set(spread) == set(HOSTS), f"connections spread over all nodes: {spread}"
        node_of_ip = {h: f"n{i}" for i, h in enumerate(HOSTS, start=2)}
        for _, ip, mark in clients:
            assert mark.startswith(node_of_ip[ip] + "."), "the mark names the node reached"

        # SIGKILL a node: it leaves DNS within its lease TTL (3 s).
        victim = HOSTS[0]
        t0 = time.monotonic()
        nodes[victim].proc.kill()
        wait_until(lambda: victim not in dns_.lookup(), 3 + 3, "the dead node leaves DNS")
        left_after = time.monotonic() - t0
        survivors, reconnected = [], []
        for s, ip, mark in clients:
            if ip == victim:
                s.close()
                s2, ip2, mark2 = converse(dns_, port)
                assert ip2 != victim
                assert mark2 != mark
                reconnected.append((s2, ip2, mark2))
            else:
                s.sendall(b"still\n")
                assert s.recv(200).decode() == f"{mark} u1 still\n", "others see nothing"
                survivors.append((s, ip, mark))
        assert reconnected, "the victim had clients"

        # SIGTERM (drain) another: it leaves DNS at once.
        drained = HOSTS[1]
        t0 = time.monotonic()
        nodes[drained].proc.signal(signal.SIGTERM)
        wait_until(lambda: drained not in dns_.lookup(), 2, "the draining node leaves DNS")
        left_on_drain = time.monotonic() - t0
        assert dns_.lookup() == [HOSTS[2]]
        print(
            f"left DNS: {left_after:.2f}s after SIGKILL (TTL 3 s), "
            f"{left_on_drain:.2f}s after SIGTERM"
        )
        record(
            "node SIGKILL behind DNS",
            connections=len(clients),
            held=len(survivors),
            recovery_s=round(left_after, 2),
            note=f"{len(reconnected)} reconnected elsewhere with new marks",
        )
        record(
            "node SIGTERM behind DNS",
            connections=len(clients),
            recovery_s=round(left_on_drain, 2),
            note=f"left DNS after {left_on_drain:.2f}s (at once: under the 3 s TTL)",
        )
        for s, _, _ in survivors + reconnected:
            s.close()
    finally:
        dns_.stop()
