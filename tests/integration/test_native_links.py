"""Which link implementation a node runs, and the fallback when the native
one is not built: the node says which at start-up and serves either way.

The native module missing is made real: the node runs from a copy of the
package without the compiled file, as on a machine without a C compiler or
libnghttp2-dev."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from pmlb.transport import TransportError, ngh2
from tests.conftest import Cluster
from tests.support import ROOT, ask_line, needs, wait_until

needs_native = needs(
    None if ngh2.available() else f"the native link transport: {ngh2.why_not()} (make install)"
)


@needs_native
def test_by_default_the_node_runs_native_links_and_says_so(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    node = cluster.node([f"u1={up.addr}"], wait_links=["u1"])
    assert b"hello" in ask_line(node.port, b"hello\n")
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
    assert b"hello" in ask_line(node.port, b"hello\n")
    wait_until(
        lambda: (
            "links on grpclib (pure Python), not nghttp2: the native module is not built"
            in node.proc.log()
        ),
        10,
        "the fallback said at start-up",
    )
    assert "make install builds it" in node.proc.log()


async def _h2_peer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool
) -> None:
    """An HTTP/2 server (h2) that answers a stream's headers and PINGs, or,
    with ``answers`` False, takes the connection and then reads and drops
    everything (a peer whose process froze with its kernel still up)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    try:
        while data := await reader.read(65536):
            if not answers:
                continue
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    conn.send_headers(
                        ev.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
                    )
            writer.write(conn.data_to_send())  # PING answers among it
            await writer.drain()
    finally:
        writer.close()


@needs_native
@pytest.mark.parametrize("answers", [True, False], ids=["answering", "frozen"])
async def test_a_link_pings_and_a_peer_that_stops_answering_is_dropped(
    monkeypatch: pytest.MonkeyPatch, answers: bool
) -> None:
    """HTTP/2 keepalive on native links, with no mark bound: a peer that
    answers PINGs keeps its link however long it is quiet; one that stops
    answering (and moves no data) is dropped after one period plus the
    timeout, and the reader is told why."""
    period = 0.2
    monkeypatch.setattr(ngh2, "KEEPALIVE_TIME", period)
    monkeypatch.setattr(ngh2, "KEEPALIVE_TIMEOUT", period)
    server = await asyncio.start_server(lambda r, w: _h2_peer(r, w, answers), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ngh2.open_client(f"127.0.0.1:{port}", tls=None, metadata={})
    try:
        reading = asyncio.ensure_future(client.read())
        if answers:
            deadline = asyncio.get_running_loop().time() + 10
            while client._conn.s.pings_acked < 5:
                assert asyncio.get_running_loop().time() < deadline, "no PING answered"
                await asyncio.sleep(period / 4)
            assert not reading.done(), "a quiet link that answers PINGs stays up"
            reading.cancel()
        else:
            with pytest.raises(TransportError, match="keepalive PING unanswered"):
                await asyncio.wait_for(reading, 10)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
