"""Network namespaces for the partition suite: one host per namespace, all on
one Linux bridge, faults as nftables drop rules and tc tbf inside them.

Every name starts with ``pmlbp-``; ``Net.destroy`` (and ``Net.create``, for
what a killed run left behind) deletes every such namespace, which deletes
the veth pairs and the bridge in them. The root namespace gets nothing: the
test drives clients and reads metrics by running commands inside the
namespaces (``Net.run`` / ``Net.spawn``), so no packet for the test's
addresses is ever routed by the machine itself.

Addresses are 10.213.0.0/24, which exist only on this bridge: a process in
one of these namespaces has no route anywhere else.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pmlbp-"
SUBNET = "10.213.0"
SWITCH = PREFIX + "sw"


ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def leftover_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    try:
        r = sh("ip", "netns", "add", PREFIX + "probe", check=False)
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()} (needs root)"
    sh("ip", "netns", "del", PREFIX + "probe", check=False)
    try:
        sh("nft", "--version")
    except (FileNotFoundError, RuntimeError):
        return "nft is not installed (Debian: nftables)"
    return None


@dataclass
class Host:
    name: str
    addr: str

    @property
    def ns(self) -> str:
        return PREFIX + self.name


@dataclass
class Net:
    hosts: dict[str, Host] = field(default_factory=dict)

    def create(self, names: Sequence[str]) -> None:
        self.destroy_leftovers()
        sh("ip", "netns", "add", SWITCH)
        self._in(SWITCH, "ip", "link", "set", "lo", "up")
        self._in(SWITCH, "ip", "link", "add", "br0", "type", "bridge")
        self._in(SWITCH, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(names):
            host = Host(name, f"{SUBNET}.{10 + i}")
            self.hosts[name] = host
            sh("ip", "netns", "add", host.ns)
            # The pair is made inside the switch, one end then moved to the host.
            self._in(SWITCH, "ip", "link", "add", name, "type", "veth", "peer", "name", "eth0")
            self._in(SWITCH, "ip", "link", "set", "eth0", "netns", host.ns)
            self._in(SWITCH, "ip", "link", "set", name, "master", "br0", "up")
            self._in(host.ns, "ip", "link", "set", "lo", "up")
            self._in(host.ns, "ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
            self._in(host.ns, "ip", "link", "set", "eth0", "up")
            self._in(
                host.ns,
                "nft",
                "add table inet pmlbp; "
                "add chain inet pmlbp in { type filter hook input priority 0; }; "
                "add chain inet pmlbp out { type filter hook output priority 0; }",
            )

    def destroy(self) -> None:
        for host in self.hosts.values():
            sh("ip", "netns", "del", host.ns, check=False)
        self.hosts.clear()
        sh("ip", "netns", "del", SWITCH, check=False)

    @staticmethod
    def destroy_leftovers() -> None:
        for ns in leftover_namespaces():
            sh("ip", "netns", "del", ns, check=False)

    @staticmethod
    def _in(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd)

    # -- running things inside --------------------------------------------------

    def run(self, host: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``host``'s namespace; its result (not checked)."""
        return sh("ip", "netns", "exec", self.hosts[host].ns, *cmd, check=False, timeout=timeout)

    def spawn(self, host: str, cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in ``host``'s namespace (``ip netns exec`` execs it:
        the PID is the program's own)."""
        out = log.open("ab")
        return subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].ns, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    # -- faults -----------------------------------------------------------------

    def drop(self, host: str, peer: str, direction: str = "both") -> None:
        """Silently drop what ``host`` receives from (``in``) and/or sends to
        (``out``) ``peer``: no RST, no ICMP, as a cut cable looks."""
        addr = self.hosts[peer].addr
        rules = []
        if direction in ("both", "in"):
            rules.append(f"add rule inet pmlbp in ip saddr {addr} drop")
        if direction in ("both", "out"):
            rules.append(f"add rule inet pmlbp out ip daddr {addr} drop")
        self._in(self.hosts[host].ns, "nft", "; ".join(rules))

    def heal(self, host: str) -> None:
        ns = self.hosts[host].ns
        self._in(ns, "nft", "flush chain inet pmlbp in; flush chain inet pmlbp out")

    def heal_all(self) -> None:
        for name in self.hosts:
            self.heal(name)

    def limit(self, host: str, peer: str, rate: str = "1mbit") -> None:
        """Move the traffic between ``host`` and ``peer`` onto a link of their
        own, limited to ``rate`` each way (tc tbf on both ends), leaving their
        traffic with everyone else on the bridge. (This kernel has tbf but no
        classful qdisc to shape one destination on a shared link.)"""
        a, b = self.hosts[host], self.hosts[peer]
        self._in(a.ns, "ip", "link", "add", "slow0", "type", "veth", "peer", "name", "slow1")
        self._in(a.ns, "ip", "link", "set", "slow1", "netns", b.ns)
        for h, dev, mine, theirs, other in (
            (a, "slow0", "10.213.1.1", "10.213.1.2", b),
            (b, "slow1", "10.213.1.2", "10.213.1.1", a),
        ):
            self._in(h.ns, "ip", "addr", "add", f"{mine}/30", "dev", dev)
            self._in(h.ns, "ip", "link", "set", dev, "up")
            self._in(h.ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", rate, "burst", "32kbit", "latency", "400ms")  # fmt: skip
            self._in(h.ns, "ip", "route", "add", f"{other.addr}/32", "via", theirs)

    def unlimit(self, host: str, peer: str) -> None:
        """Back onto the bridge (deleting one end of the pair deletes both)."""
        a, b = self.hosts[host], self.hosts[peer]
        sh("ip", "netns", "exec", a.ns, "ip", "route", "del", f"{b.addr}/32", check=False)
        sh("ip", "netns", "exec", b.ns, "ip", "route", "del", f"{a.addr}/32", check=False)
        sh("ip", "netns", "exec", a.ns, "ip", "link", "del", "slow0", check=False)
