"""The compose example runs etcd with authentication (security review,
finding 5): ``deploy/compose/etcd_auth.py``, run as compose runs it, against
a real etcd; then pmlb as the compose services use it (the ``pmlb`` user
through PMLB_ETCD_USER / PMLB_ETCD_PASSWORD): upstreams added, a node
registered with its DNS record, and nobody without a password writes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Cluster, Etcd, etcdctl_binary
from tests.support import ROOT, run_pmlb, wait_until

SCRIPT = ROOT / "deploy" / "compose" / "etcd_auth.py"
PASSWORDS = {
    "ETCD_ROOT_PASSWORD": "r00t-pw",
    "PMLB_ETCD_PASSWORD": "pmlb-pw",
    "COREDNS_ETCD_PASSWORD": "dns-pw",
}


def test_the_compose_etcd_auth_setup(etcd: Etcd, cluster: Cluster) -> None:
    dns = f"/skydns{etcd.prefix}"
    env = {**PASSWORDS, "PMLB_ETCD_PREFIX": etcd.prefix, "PMLB_DNS_PREFIX": dns}
    for attempt in ("first", "again"):
        r = subprocess.run(
            [sys.executable, str(SCRIPT), etcd.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert r.returncode == 0, (attempt, r.stdout, r.stderr)
    assert "already on" in r.stdout

    # Without a password: refused, for reading and writing.
    denied = subprocess.run(
        [
            etcdctl_binary(),
            "--endpoints",
            etcd.url,
            "put",
            etcd.prefix + "/services/echo/upstreams/evil",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert denied.returncode != 0
    assert "user name is empty" in denied.stderr or "permission denied" in denied.stderr

    user = {"PMLB_ETCD_USER": "pmlb", "PMLB_ETCD_PASSWORD": PASSWORDS["PMLB_ETCD_PASSWORD"]}
    up = cluster.echo("u1")
    r = run_pmlb(
        "upstream", "add", "echo", "u1", up.addr, "--etcd", etcd.url, "--etcd-prefix",
        etcd.prefix, env=user,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    node = cluster.node(
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1"],
        env=user,
        extra=["--dns-name", "lb.test", "--dns-prefix", dns],
    )
    assert node.proc.alive()
    root = ["--user", f"root:{PASSWORDS['ETCD_ROOT_PASSWORD']}"]
    keys = etcd.ctl(*root, "get", "--prefix", "--keys-only", etcd.prefix + "/nodes/")
    assert f"{etcd.prefix}/nodes/n1" in keys
    # CoreDNS's user reads the DNS records, and writes nothing.
    coredns = ["--user", f"coredns:{PASSWORDS['COREDNS_ETCD_PASSWORD']}"]
    wait_until(
        lambda: etcd.ctl(*coredns, "get", "--prefix", "--print-value-only", dns + "/"), 20, "dns"
    )
    record = etcd.ctl(*coredns, "get", "--prefix", "--print-value-only", dns + "/")
    assert json.loads(record.splitlines()[0])["host"] == "127.0.0.1"
    r = subprocess.run(
        [etcdctl_binary(), "--endpoints", etcd.url, *coredns, "put", dns + "/x", "{}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode != 0
    assert "permission denied" in r.stderr
