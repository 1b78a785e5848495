"""Fixtures shared by the integration and end-to-end suites."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Proc, free_port, scrape, tcp_open, wait_until


@dataclass
class Upstream:
    proc: Proc
    id: str
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Node:
    proc: Proc
    port: int
    admin: int

    def metrics(self) -> dict[str, float]:
        return scrape(self.admin)


class Cluster:
    """Starts real pmlb processes for one test and stops them all by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def echo(self, uid: str, *, plain: bool = False, port: int | None = None) -> Upstream:
        port = port or free_port()
        args = ["echo-upstream", "--listen", f"127.0.0.1:{port}", "--id", uid]
        if plain:
            args.append("--plain")
        proc = Proc(f"echo-{uid}-{len(self.procs)}", args, self.log_dir)
        self.procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, f"echo {uid}")
        assert proc.alive(), proc.log()
        return Upstream(proc, uid, port)

    def node(
        self,
        upstreams: list[str],
        *,
        framing: str = "line",
        node_id: str = "n1",
        extra: list[str] | None = None,
        wait_links: list[str] | None = None,
    ) -> Node:
        port, admin = free_port(), free_port()
        args = [
            "node",
            "--node-id",
            node_id,
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--framing",
            framing,
        ]
        for u in upstreams:
            args += ["--upstream", u]
        proc = Proc(f"node-{node_id}-{len(self.procs)}", args + (extra or []), self.log_dir)
        self.procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, "node listener")
        assert proc.alive(), proc.log()
        node = Node(proc, port, admin)
        ids = wait_links if wait_links is not None else [u.partition("=")[0] for u in upstreams]
        for uid in ids:
            wait_until(
                lambda uid=uid: node.metrics().get(f'pmlb_upstream_up{{upstream="{uid}"}}') == 1,
                15,
                f"link to {uid} up",
            )
        return node

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
