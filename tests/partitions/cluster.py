"""A pmlb cluster spread over network namespaces (tests/partitions/net.py).

Hosts: ``e1 e2 e3`` (a three-member etcd cluster), ``n1 n2 n3`` (nodes),
``u1 u2 u3`` (journaling SDK upstreams, tests/faults/journal_upstream.py) and
``c1`` (clients and the operator's CLI). Every process runs in its host's
namespace and is stopped by PID; the test reads a node's metrics with curl
inside the node's namespace (admin on its own loopback) and drives clients
with tests/partitions/driver.py inside ``c1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmlb.testing.localetcd import etcd_binary
from tests.partitions.net import Net
from tests.support import ROOT

HOSTS = ("e1", "e2", "e3", "n1", "n2", "n3", "u1", "u2", "u3", "c1")
ETCD_MEMBERS = ("e1", "e2", "e3")
NODE_PORT, ADMIN_PORT, CONTROL_PORT, UPSTREAM_PORT = 9000, 9100, 9200, 7001
TOKENS = {"PMLB_CONTROL_TOKEN": "partition-ctl", "PMLB_UPSTREAM_TOKEN": "partition-up"}
# Short enough for a suite of minutes; the figures scale with them (README).
LEASE_TTL = 3
ACK_TIMEOUT = 2.0


def wait(cond: Callable[[], object], timeout: float, what: str, step: float = 0.1) -> float:
    """Poll ``cond`` until true; seconds it took. Fails with ``what``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


@dataclass
class Proc:
    name: str
    host: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class PartitionCluster:
    def __init__(self, net: Net, log_dir: Path) -> None:
        self.net = net
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.prefix = f"/pmlbp-{int(time.time() * 1000)}"

    def addr(self, host: str) -> str:
        return self.net.hosts[host].addr

    @property
    def endpoints(self) -> str:
        return ",".join(f"http://{self.addr(e)}:2379" for e in ETCD_MEMBERS)

    def spawn(self, name: str, host: str, cmd: list[str]) -> Proc:
        log = self.log_dir / f"{name}.log"
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.net.hosts[host].ns, *cmd],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            # Nodes at the default worker count (one per CPU), as users run
            # them (the suite's conftest pins 1 for tests that do not ask).
            # Beyond loopback the control API and the Bridge need credentials:
            # nodes send the upstream token, the SDK upstreams require it.
            env={**os.environ, "PMLB_WORKERS": "0", **TOKENS},
        )
        proc = Proc(name, host, popen, log)
        self.procs.append(proc)
        return proc

    # -- etcd ----------------------------------------------------------------------

    def start_etcd(self) -> None:
        initial = ",".join(f"{e}=http://{self.addr(e)}:2380" for e in ETCD_MEMBERS)
        for e in ETCD_MEMBERS:
            a = self.addr(e)
            self.spawn(
                f"etcd-{e}",
                e,
                [
                    etcd_binary(),
                    "--name", e,
                    "--data-dir", str(self.log_dir / f"etcd-{e}"),
                    "--listen-client-urls", f"http://{a}:2379",
                    "--advertise-client-urls", f"http://{a}:2379",
                    "--listen-peer-urls", f"http://{a}:2380",
                    "--initial-advertise-peer-urls", f"http://{a}:2380",
                    "--initial-cluster", initial,
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", "pmlbp",
                    "--log-level", "warn",
                ],
            )  # fmt: skip
        wait(lambda: self.etcdctl("endpoint", "health").returncode == 0, 30, "etcd healthy")

    @staticmethod
    def ctl_path() -> str:
        return str(Path(etcd_binary()).with_name("etcdctl"))

    def etcdctl(self, *args: str, endpoints: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.net.run(
            "c1",
            self.ctl_path(),
            "--endpoints",
            endpoints or self.endpoints,
            "--command-timeout",
            "2s",
            "--dial-timeout",
            "2s",
            *args,
            timeout=20,
        )

    def etcd_get(self, key: str) -> str | None:
        r = self.etcdctl("get", self.prefix + key, "--print-value-only")
        if r.returncode != 0:
            raise AssertionError(f"etcdctl get {key}: {r.stderr}")
        return r.stdout.rstrip("\n") or None

    def etcd_keys(self, under: str) -> list[str]:
        r = self.etcdctl("get", "--prefix", "--keys-only", self.prefix + under)
        if r.returncode != 0:
            raise AssertionError(f"etcdctl get {under}: {r.stderr}")
        return [k for k in r.stdout.splitlines() if k]

    def leader(self) -> str:
        """The etcd member that leads now."""
        r = self.etcdctl("endpoint", "status", "--cluster", "-w", "json")
        for st in json.loads(r.stdout):
            if st["Status"]["header"]["member_id"] == st["Status"].get("leader"):
                url = st["Endpoint"]
                return next(e for e in ETCD_MEMBERS if self.addr(e) + ":" in url)
        raise AssertionError(f"no etcd leader: {r.stdout} {r.stderr}")

    # -- pmlb ----------------------------------------------------------------------

    def pmlb(
        self, *args: str, host: str = "c1", timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.net.run(
            host,
            sys.executable,
            "-m",
            "pmlb",
            *args,
            "--etcd",
            self.endpoints,
            "--etcd-prefix",
            self.prefix,
            timeout=timeout,
        )

    def start_upstream(self, host: str) -> Proc:
        proc = self.spawn(
            f"upstream-{host}",
            host,
            [
                sys.executable, "-m", "tests.faults.journal_upstream",
                "--listen", f"{self.addr(host)}:{UPSTREAM_PORT}",
                "--id", host,
                "--journal", str(self.log_dir / f"journal-{host}.txt"),
                "--closes", str(self.log_dir / f"closes-{host}.txt"),
            ],
        )  # fmt: skip
        r = self.pmlb("upstream", "add", "echo", host, f"{self.addr(host)}:{UPSTREAM_PORT}")
        assert r.returncode == 0, r.stderr
        return proc

    def start_node(self, host: str, *extra: str, ack_timeout: float | None = ACK_TIMEOUT) -> Proc:
        """``ack_timeout`` None: the node's default --ack-timeout."""
        a = self.addr(host)
        proc = self.spawn(
            f"node-{host}",
            host,
            [
                sys.executable, "-m", "pmlb", "node",
                "--node-id", host,
                "--service", "echo",
                "--framing", "line",
                "--listen", f"{a}:{NODE_PORT}",
                "--admin", f"127.0.0.1:{ADMIN_PORT}",
                "--control", f"{a}:{CONTROL_PORT}",
                "--advertise", a,
                "--etcd", self.endpoints,
                "--etcd-prefix", self.prefix,
                "--lease-ttl", str(LEASE_TTL),
                "--check-interval", "0.3",
                "--check-timeout", "0.3",
                "--check-rise", "1",
                "--check-fall", "2",
                *(["--ack-timeout", str(ack_timeout)] if ack_timeout is not None else []),
                "--drain-timeout", "1",
                # DNS records (CoreDNS etcd plugin keys) under the node's lease.
                "--dns-name", "lb.pmlbp.test",
                "--dns-prefix", self.prefix + "/skydns",
                *extra,
            ],
        )  # fmt: skip
        wait(lambda: self.metrics(host).get("pmlb_marks_open") is not None, 20, f"node {host}")
        return proc

    def metrics(self, host: str) -> dict[str, float]:
        r = self.net.run(host, "curl", "-s", "-m", "2", f"http://127.0.0.1:{ADMIN_PORT}/metrics")
        out: dict[str, float] = {}
        for line in r.stdout.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    def links_up(self, node: str, upstreams: list[str]) -> bool:
        m = self.metrics(node)
        return all(m.get(f'pmlb_upstream_up{{upstream="{u}"}}') == 1 for u in upstreams)

    def drive(self, node: str, name: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start streaming clients against ``node`` (driver.py in c1)."""
        out = self.log_dir / f"drive-{name}.json"
        args = [sys.executable, "-m", "tests.partitions.driver"]
        args += ["--node", f"{self.addr(node)}:{NODE_PORT}", "--out", str(out)]
        for k, v in kw.items():
            args += [f"--{k}", str(v)]
        proc = self.spawn(f"drive-{name}", "c1", args)
        return proc.popen

    def result(self, name: str, popen: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        popen.wait(timeout)
        data: dict[str, Any] = json.loads((self.log_dir / f"drive-{name}.json").read_text())
        return data

    def closes(self) -> dict[str, str]:
        """mark -> the close reason its upstream was given (the last one)."""
        out: dict[str, str] = {}
        for path in sorted(self.log_dir.glob("closes-*.txt")):
            for line in path.read_text().splitlines():
                mark, _, reason = line.partition(" ")
                out[mark] = reason
        return out

    def rss(self, name: str) -> int:
        """Resident memory of process ``name`` and its children (a node's
        workers), in bytes."""
        total = 0
        for pid in _tree(self.proc(name).popen.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone meanwhile
                continue
            kb = next(
                (line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")), "0"
            )
            total += int(kb) * 1024
        return total

    def journals(self) -> list[Path]:
        return sorted(self.log_dir.glob("journal-*.txt"))

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from each process's parent in /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out
