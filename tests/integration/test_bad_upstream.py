"""An upstream that breaks the contract hurts only what it must.

The rogue here is a real gRPC server speaking raw bytes on the Bridge method,
so it can send what no SDK would: unparseable messages, frames for marks the
node does not hold, frames of the wrong kind, payloads over the frame limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from tests.conftest import Cluster
from tests.support import async_wait_until, http_get

pytestmark = pytest.mark.asyncio(loop_scope="function")

GHOST = "n1.aaaaaaaaaaaaa.zz"


async def _serve(bridge: Any) -> tuple[grpc.aio.Server, int]:
    """A real gRPC server whose pmlb.v1.Upstream/Bridge speaks raw bytes both ways."""
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(bridge)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pmlb.v1.Upstream", {"Bridge": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _hello(name: str) -> bytes:
    """The first Batch an upstream owes the node: its Hello, with a large window."""
    batch = pb.Batch()
    batch.hello.id = name
    batch.hello.protocol = 1
    batch.hello.initial_window = 1 << 20
    return batch.SerializeToString()


class Rogue:
    def __init__(self) -> None:
        self.closes_seen: dict[str, str] = {}
        self.refused: list[tuple[str, str, int, int]] = []

    async def bridge(self, _it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.read()  # the node's hello
        await context.write(_hello("rogue"))
        while True:
            raw = await context.read()
            if not isinstance(raw, bytes):
                return
            out = pb.Batch()
            for f in pb.Batch.FromString(raw).frames:
                if f.HasField("close"):
                    self.closes_seen[f.mark] = f.close.reason
                if f.HasField("refused"):
                    r = f.refused
                    self.refused.append((f.mark, r.reason, r.size, r.limit))
                if not f.HasField("data"):
                    continue
                payload = f.data.payload
                if payload == b"garbage":
                    await context.write(b"\xff\xff\xff\xff this is not a Batch")
                    out.frames.add(mark=GHOST, data=pb.Data(payload=b"to nobody"))
                    out.frames.add(mark=f.mark, open=pb.Open(service="wrong way"))
                if payload == b"oversize":
                    out.frames.add(mark=f.mark, data=pb.Data(payload=b"o" * 5000))
                    continue
                if payload == b"bigmeta":  # over the node's --max-meta (16384)
                    out.frames.add(mark=f.mark, meta=pb.Meta(set={"k": "v" * 20000}))
                out.frames.add(mark=f.mark, data=pb.Data(payload=b"echo " + payload))
            await context.write(out.SerializeToString())


async def test_garbage_unknown_marks_and_bad_frames_are_contained(cluster: Cluster) -> None:
    rogue = Rogue()
    server, port = await _serve(rogue.bridge)
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"rogue=127.0.0.1:{port}"],
            framing="line",
            extra=["--max-frame", "1024"],
        )

        async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", node.port)

        async def ask(c: tuple[asyncio.StreamReader, asyncio.StreamWriter], msg: bytes) -> bytes:
            c[1].write(msg + b"\n")
            return await c[0].readuntil(b"\n")

        async with asyncio.timeout(30):
            bystanders = [await client() for _ in range(10)]
            for c in bystanders:
                assert await ask(c, b"before") == b"echo before\n"

            g = await client()
            assert await ask(g, b"garbage") == b"echo garbage\n", "the link survived garbage"

            # An oversized reply is not delivered: the upstream is told (Refused)
            # and the client stays connected for the next answer.
            x = await client()
            x[1].write(b"oversize\n")
            await async_wait_until(lambda: rogue.refused, 10, "the rogue told of its refusal")
            assert [(r[1], r[2], r[3]) for r in rogue.refused] == [
                ("payload_too_large", 5000, 1024)
            ]
            assert await ask(x, b"bigmeta") == b"echo bigmeta\n"
            await async_wait_until(lambda: len(rogue.refused) == 2, 10, "meta refused")
            assert rogue.refused[1][1:] == ("metadata_too_large", 20001, 16384)

            for c in [*bystanders, g, x]:
                assert await ask(c, b"after") == b"echo after\n"
            for c in [*bystanders, g, x]:
                c[1].close()

        m = await asyncio.to_thread(node.metrics)
        assert m["pmlb_garbage_batches_total"] == 1
        assert m["pmlb_unknown_mark_frames_total"] == 1
        # the open, the oversized payload, the oversized metadata
        assert m["pmlb_bad_upstream_frames_total"] == 3
        assert 'pmlb_connections_closed_total{reason="protocol_error"}' not in m
        assert m['pmlb_upstream_up{upstream="rogue"}'] == 1
        assert rogue.closes_seen.get(GHOST) == "unknown_mark", "the rogue is told the mark is gone"
        log = node.proc.log()
        assert "not a pmlb.v1.Batch" in log
        assert "unexpected frame kind open" in log
    finally:
        await server.stop(0)


class NeverAcks:
    """Grants credit generously but never acknowledges: replay data piles up."""

    async def bridge(self, _it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.read()
        await context.write(_hello("never-acks"))
        while True:
            raw = await context.read()
            if not isinstance(raw, bytes):
                return
            out = pb.Batch()
            for f in pb.Batch.FromString(raw).frames:
                if f.HasField("data"):
                    out.frames.add(mark=f.mark, flow=pb.Flow(credit=len(f.data.payload)))
            await context.write(out.SerializeToString())


@pytest.mark.asyncio
async def test_replay_buffer_is_bounded(cluster: Cluster) -> None:
    server, port = await _serve(NeverAcks().bridge)
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"na=127.0.0.1:{port}"],
            framing="line",
            extra=["--replay-buffer", "20000"],
        )
        async with asyncio.timeout(20):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            _other_r, other_w = await asyncio.open_connection("127.0.0.1", node.port)
            other_w.write(b"small\n")
            for _ in range(300):  # 30 KB, never acknowledged
                w.write(b"x" * 99 + b"\n")
            # Closed with unread input pending, the kernel may answer with a RST
            # (or, while we still write, EPIPE); the metrics below say why.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                assert await r.read() == b"", "closed once its replay buffer overflowed"
            other_w.write(b"still here\n")
            await other_w.drain()
        m = await asyncio.to_thread(node.metrics)
        assert m["pmlb_replay_overflows_total"] == 1
        assert m['pmlb_connections_closed_total{reason="replay_overflow"}'] == 1
        closed = {k: v for k, v in m.items() if k.startswith("pmlb_connections_closed_total")}
        assert closed.pop('pmlb_connections_closed_total{reason="replay_overflow"}') == 1
        # Only the fixture's readiness probe may have closed besides (it connects and
        # leaves); the other client's mark is untouched.
        assert closed.get('pmlb_connections_closed_total{reason="client_closed"}', 0) <= 1
        assert set(closed) <= {'pmlb_connections_closed_total{reason="client_closed"}'}, closed
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/connections")
        assert [m["frames_in"] for m in json.loads(body)["marks"] if m["frames_in"]] == [2], (
            "the other client's mark is still open"
        )
        other_w.close()
    finally:
        await server.stop(0)
