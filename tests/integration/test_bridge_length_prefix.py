"""One Bridge message cannot grow a process past the message limit (security
review, finding 3): a peer declared 1 GiB in a message's 5-byte length prefix
and sent 200 MiB of it to an SDK upstream with no token, and grpclib buffered
all of it before the size check (RSS 50 MB -> 265 MB). A node's links read
the same way, so a hostile upstream could do it to a node.

Here a hostile HTTP/2 peer (tests/hostile_h2.py, on the h2 state machine)
declares 1 GiB and sends 256 MiB as fast as flow control lets it, while the
target's RSS is sampled every 50 ms. The target either drops the message
unread as it arrives (grpclib: pmlb.transport.h2lib) or refuses the stream on
the prefix (grpc-js, grpcio); either way its peak growth stays far below what
was sent, and it goes on serving."""

from __future__ import annotations

import socket
import time

import pytest

from pmlb.transport import TRANSPORTS
from tests.conftest import Cluster
from tests.faults.report import record
from tests.hostile_h2 import FloodServer, PeakRss, flood_as_client
from tests.integration.test_nodejs_sdk import js_upstream
from tests.support import children

DECLARED = 1 << 30
SENT = 256 << 20
# GRPC_MAX_MESSAGE is 64 MiB: a process may hold one whole legitimate message
# of that size, never the 256 MiB of a declared 1 GiB.
BOUND = 64 << 20


def _echo_through(port: int, tries: int = 4) -> bool:
    """A client of the node gets its line back (round robin may first give a
    client to the hostile upstream, which never answers: try a few)."""
    for _ in range(tries):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"still here\n")
            s.settimeout(1.5)
            try:
                # The echo upstream answers "[upstream id mark] " + the line.
                if s.recv(256).endswith(b"still here\n"):
                    return True
            except TimeoutError:
                continue
    return False


@pytest.mark.parametrize("sdk", ["python", "nodejs"])
def test_an_sdk_upstream_holds_no_oversized_message(
    cluster: Cluster, sdk: str, request: pytest.FixtureRequest
) -> None:
    if sdk == "python":
        up = cluster.echo("u1")
    else:
        up = js_upstream(cluster, request.getfixturevalue("node_bin"), "u1")
    peak = PeakRss(lambda: [up.proc.pid])
    flood = flood_as_client(up.addr, DECLARED, SENT)
    growth = peak.growth()
    assert flood.ended, flood
    assert growth < BOUND, (
        f"{sdk}: RSS grew {growth >> 20} MiB while {flood.sent >> 20} MiB of a declared "
        f"1 GiB message arrived ({flood.ended})"
    )
    assert up.proc.alive(), up.proc.log()
    record(
        f"oversized Bridge message to the {sdk} SDK",
        note=f"declared 1024 MiB, {flood.sent >> 20} MiB arrived ({flood.ended}); "
        f"peak RSS growth {growth / 2**20:.1f} MiB",
    )
    # It still serves a real node.
    node = cluster.node([f"u1={up.addr}"], wait_links=["u1"])
    assert _echo_through(node.port, tries=1)


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(DECLARED, SENT), (96 << 20, 96 << 20)],
    ids=["1GiB-declared", "96MiB-whole"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_node_holds_no_oversized_message_from_an_upstream(
    cluster: Cluster, transport: str, declared: int, sent: int
) -> None:
    good = cluster.echo("u2")
    hostile = FloodServer(declared, sent)
    try:
        node = cluster.node(
            [f"u1={hostile.addr}", f"u2={good.addr}"],
            wait_links=["u2"],
            extra=["--link-transport", transport],
        )
        peak = PeakRss(lambda: [node.proc.pid, *children(node.proc.pid)])
        assert hostile.done.wait(120), "the flood did not finish"
        growth = peak.growth()
        result = hostile.result
        assert result is not None
        assert result.sent > 0, result
        assert growth < BOUND, (
            f"{transport}: node RSS grew {growth >> 20} MiB while {result.sent >> 20} MiB of "
            f"a declared {declared >> 20} MiB message arrived ({result.ended})"
        )
        assert node.proc.alive(), node.proc.log()
        record(
            f"oversized Bridge message to a node [{transport}]",
            note=f"declared {declared >> 20} MiB, {result.sent >> 20} MiB arrived "
            f"({result.ended}); peak RSS growth {growth / 2**20:.1f} MiB",
        )
        assert _echo_through(node.port), "the node still serves its clients"
        if result.ended == "sent" and sent == declared:
            # The whole message arrived and was dropped unread: counted as
            # garbage, like any Batch that is not one, and logged.
            deadline = time.monotonic() + 10
            while node.metrics().get("pmlb_garbage_batches_total", 0) != 1:
                assert time.monotonic() < deadline, "the dropped message is not counted"
                time.sleep(0.05)
            assert "unread" in node.proc.log()
    finally:
        hostile.close()
