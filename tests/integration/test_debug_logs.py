"""Secrets stay out of the logs at --log-level debug too (security review,
finding 7): hpack logged every header it encoded or decoded, so the
upstream token (``authorization: Bearer ...``) appeared in the node's and
the SDK's debug logs. README says secrets are never logged."""

from __future__ import annotations

import socket

from tests.conftest import Cluster
from tests.support import Proc, free_port, tcp_open, wait_until

TOKEN = "up-t0ken-s3cret-7f3a"


def test_the_upstream_token_is_not_logged_at_debug(cluster: Cluster) -> None:
    env = {"PMLB_UPSTREAM_TOKEN": TOKEN}
    port = free_port()
    up = Proc(
        "echo-debug",
        ["echo-upstream", "--listen", f"127.0.0.1:{port}", "--id", "u1", "--log-level", "debug"],
        cluster.log_dir,
        env,
    )
    cluster.procs.append(up)
    wait_until(lambda: tcp_open("127.0.0.1", port), 15, "upstream")
    node = cluster.node([f"u1=127.0.0.1:{port}"], env=env, extra=["--log-level", "debug"])
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"hi\n")
        assert s.recv(100).endswith(b" u1 hi\n"), "the token was accepted"
    assert " DEBUG " in node.proc.log(), "debug logging is on"
    for proc in (node.proc, up):
        assert TOKEN not in proc.log(), proc.log_path
