"""An unauthenticated Bridge peer cannot forge upstream log lines (security
review, finding 8): a Hello id with a newline and an ESC in it produced a
fake WARNING line in both SDKs. Now every line they log is one printable
line, whatever a peer sends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol.wire import BRIDGE_METHOD
from tests.conftest import Cluster, Upstream
from tests.integration.test_nodejs_sdk import js_upstream
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")

FORGED = "2026-12-07 12:00:00,000 ERROR pmlb.upstream: forged by a peer"


async def _hostile_hello(addr: str) -> None:
    """Open a Bridge stream with a Hello whose id carries a new log line."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            BRIDGE_METHOD,
            request_serializer=pb.Batch.SerializeToString,
            response_deserializer=pb.Batch.FromString,
        )()
        hello = pb.Batch(hello=pb.Hello(id=f"n1\n{FORGED}\x1b]0;pwned\x07", protocol=2))
        bad_mark = pb.Frame(mark=f"m\n{FORGED}", close=pb.Close(reason="x"))
        await call.write(hello)
        await call.write(pb.Batch(frames=[bad_mark]))
        await asyncio.wait_for(call.read(), 5)  # the upstream's Hello: it took ours
        await call.done_writing()
        await asyncio.wait_for(call.read(), 5)


async def test_a_peer_cannot_forge_log_lines_in_either_sdk(cluster: Cluster, node_bin: str) -> None:
    ups: list[Upstream] = [cluster.echo("py1"), js_upstream(cluster, node_bin, "js1")]
    async with asyncio.timeout(30):
        for up in ups:
            await _hostile_hello(up.addr)
            await async_wait_until(lambda up=up: "stream ended" in up.proc.log(), 10, "logged")
    for up in ups:
        log = up.proc.log()
        assert "connected" in log, log[-2000:]
        lines = log.splitlines()
        assert not any(line.startswith(FORGED) for line in lines), log
        assert "\x1b" not in log, "no terminal escape reaches the log"
