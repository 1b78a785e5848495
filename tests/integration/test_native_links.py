"""Which link implementation a node runs, and the fallback when the native
one is not built: the node says which at start-up and serves either way.

The native module missing is made real: the node runs from a copy of the
package without the compiled file, as on a machine without a C compiler or
libnghttp2-dev."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from pmlb.transport import ngh2
from tests.conftest import Cluster
from tests.support import ROOT, needs, wait_until

needs_native = needs(
    None if ngh2.available() else f"the native link transport: {ngh2.why_not()} (make install)"
)


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


@needs_native
def test_by_default_the_node_runs_native_links_and_says_so(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    node = cluster.node([f"u1={up.addr}"], wait_links=["u1"])
    assert b"hello" in _echo(node.port, b"hello\n")
    wait_until(lambda: "links on nghttp2 (native, libnghttp2 " in node.proc.log(), 10, "log")


def test_without_the_native_module_the_node_runs_grpclib_and_says_why(
    cluster: Cluster, tmp_path: Path
) -> None:
    tree = tmp_path / "node"
    shutil.copytree(
        ROOT / "node" / "pmlb",
        tree / "pmlb",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    assert not list((tree / "pmlb" / "transport").glob("_nghttp2*.so"))
    up = cluster.echo("u1")
    env = {"PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    node = cluster.node([f"u1={up.addr}"], wait_links=["u1"], env=env)
    assert b"hello" in _echo(node.port, b"hello\n")
    wait_until(
        lambda: (
            "links on grpclib (pure Python), not nghttp2: the native module is not built"
            in node.proc.log()
        ),
        10,
        "the fallback said at start-up",
    )
    assert "make install builds it" in node.proc.log()
