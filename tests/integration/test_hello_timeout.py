"""A Bridge stream that never sends its Hello is ended (security review,
finding 9: 500 streams that sent nothing were all still held after 30 s, in
both SDKs, with no token set). Both SDKs at their default (10 s), and many
streams at a short timeout."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol.wire import BRIDGE_METHOD
from pmlb.upstream import Handler, UpstreamServer
from pmlb.upstream.sdk import DEFAULT_HELLO_TIMEOUT
from tests.conftest import Cluster
from tests.integration.test_nodejs_sdk import js_upstream

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def _silent_streams(addr: str, n: int) -> list[grpc.StatusCode | None]:
    """Open ``n`` Bridge streams that send nothing; how each ended."""
    async with grpc.aio.insecure_channel(addr) as channel:
        calls = [
            channel.stream_stream(
                BRIDGE_METHOD,
                request_serializer=pb.Batch.SerializeToString,
                response_deserializer=pb.Batch.FromString,
            )()
            for _ in range(n)
        ]

        async def outcome(call: grpc.aio.StreamStreamCall) -> grpc.StatusCode | None:
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return await call.code()

        return list(await asyncio.gather(*(outcome(c) for c in calls)))


async def test_both_sdks_end_silent_streams_at_their_default(
    cluster: Cluster, node_bin: str
) -> None:
    py, js = cluster.echo("py1"), js_upstream(cluster, node_bin, "js1")
    async with asyncio.timeout(DEFAULT_HELLO_TIMEOUT + 10):
        ended = await asyncio.gather(_silent_streams(py.addr, 5), _silent_streams(js.addr, 5))
    for up, codes in zip((py, js), ended, strict=True):
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5, (up.id, codes)
        assert "sent no Hello" in up.proc.log(), up.id


async def test_many_silent_streams_are_all_ended(cluster: Cluster) -> None:
    server = UpstreamServer(Handler(), upstream_id="u1", hello_timeout=1.0)
    await server.start()
    try:
        async with asyncio.timeout(15):
            codes = await _silent_streams(f"127.0.0.1:{server.port}", 200)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 200
        assert server.stats["hello_timeouts"] == 200
    finally:
        await server.stop(0)
