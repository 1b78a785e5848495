"""Who may act as a node on an SDK upstream's Bridge (security review,
findings 8 and 9): a peer's Hello names the node it claims to be, and with no
token or client certificates nothing checks it; nor was there any cap on the
streams such peers could hold.

* Without credentials, both SDKs serve loopback only (the admin and control
  rule), unless told ``allow_anonymous`` / ``--allow-anonymous``.
* At most ``max_streams`` (default 1024) Bridge streams are held at once;
  more are refused with RESOURCE_EXHAUSTED, at once.
* A stream may open only marks of the node its Hello names, and what is sent
  to a node by id goes on its oldest live stream: a later stream claiming a
  live node's id receives none of that node's pushes or closes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol.wire import BRIDGE_METHOD, PROTOCOL_VERSION
from pmlb.upstream import Conn, Handler, UpstreamServer
from pmlb.upstream.sdk import DEFAULT_MAX_STREAMS
from tests.conftest import Cluster
from tests.hostile_h2 import silent_streams
from tests.integration.test_nodejs_sdk import JS_SDK, js_upstream
from tests.support import Proc, free_port, run_pmlb, tcp_open, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_both_sdks_refuse_an_anonymous_bridge_beyond_loopback(
    cluster: Cluster, node_bin: str
) -> None:
    port = free_port()
    r = await asyncio.to_thread(
        run_pmlb, "echo-upstream", "--listen", f"0.0.0.0:{port}", "--id", "u1", timeout=30
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "not a loopback address" in r.stderr
    assert "--allow-anonymous" in r.stderr
    proc = await asyncio.create_subprocess_exec(
        node_bin,
        str(JS_SDK / "examples" / "echo.js"),
        "--listen",
        f"0.0.0.0:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, (out, err)
    assert b"not a loopback address" in err
    # With a token (or when allowed) a wildcard bind serves; dialled on loopback.
    for extra, env in (([], {"PMLB_UPSTREAM_TOKEN": "t0k"}), (["--allow-anonymous"], {})):
        p = Proc(
            f"echo-any-{len(cluster.procs)}",
            ["echo-upstream", "--listen", f"0.0.0.0:{port}", "--id", "u1", *extra],
            cluster.log_dir,
            env=env,
        )
        cluster.procs.append(p)
        await asyncio.to_thread(
            wait_until, lambda p=p: tcp_open("127.0.0.1", port) or not p.alive(), 15, "serving"
        )
        assert p.alive(), p.log()
        p.stop()


@pytest.mark.parametrize("sdk", ["python", "nodejs"])
async def test_streams_beyond_the_cap_are_refused_at_once(
    cluster: Cluster, sdk: str, request: pytest.FixtureRequest
) -> None:
    """At the default cap: 1024 silent streams are held (until their Hello
    timeout), the 40 beyond are refused at once; once they go, a node links."""
    if sdk == "python":
        up = cluster.echo("u1")
    else:
        up = js_upstream(cluster, request.getfixturevalue("node_bin"), "u1")
    extra = 40
    ended, socks = await asyncio.to_thread(silent_streams, up.addr, DEFAULT_MAX_STREAMS + extra)
    try:
        assert ended == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]): extra}, ended
        assert up.proc.alive()
    finally:
        for s in socks:
            s.close()
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], wait_links=["u1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"after the flood\n")
    async with asyncio.timeout(10):
        assert (await reader.readline()).endswith(b"after the flood\n")
    writer.close()
    assert "refused a Bridge stream" in up.proc.log()


class _Forged:
    """A Bridge peer whose Hello claims ``node_id``; records every frame it
    is sent after the Hello reply."""

    def __init__(self, addr: str, node_id: str) -> None:
        self.addr, self.node_id = addr, node_id
        self.frames: list[pb.Frame] = []
        self.ready = asyncio.Event()

    async def run(self, opens: list[str]) -> None:
        async with grpc.aio.insecure_channel(self.addr) as channel:
            call = channel.stream_stream(
                BRIDGE_METHOD,
                request_serializer=pb.Batch.SerializeToString,
                response_deserializer=pb.Batch.FromString,
            )()
            hello = pb.Batch()
            hello.hello.id = self.node_id
            hello.hello.protocol = PROTOCOL_VERSION
            await call.write(hello)
            if opens:
                await call.write(pb.Batch(frames=[pb.Frame(mark=m, open=pb.Open()) for m in opens]))
            async for batch in call:
                if batch.HasField("hello"):
                    self.ready.set()
                self.frames.extend(f for f in batch.frames if f.WhichOneof("kind") != "ping")


class Tagged(Handler):
    """Replies "<mark> p1 <line>", as the echo upstream does with its id."""

    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(f"{conn.mark} p1 ".encode() + data)


async def test_a_stream_claiming_a_live_node_takes_none_of_its_traffic(cluster: Cluster) -> None:
    """Finding 8: a peer whose Hello claimed a real node's id could receive
    that node's push and close_mark (the SDK picked any stream of the id),
    and could open that node's marks in its name."""
    echo = cluster.echo("u1")
    server = UpstreamServer(Tagged(), upstream_id="p1")
    await server.start()
    forged = [_Forged(f"127.0.0.1:{server.port}", "n1") for _ in range(8)]
    tasks: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"u1={echo.addr}", f"p1=127.0.0.1:{server.port}"],
            wait_links=["u1", "p1"],
            extra=["--push-upstreams", "p1", "--balancer", "least-marks"],
        )
        # Two clients: least-marks binds one to each upstream. The one on u1
        # (the echo upstream) is reached from p1 by its node id (push to a mark
        # bound elsewhere), the one on p1 by its own stream.
        # (The SDK runs in this event loop: the clients use it too.)
        bound: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter, str]] = {}
        async with asyncio.timeout(10):
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
                writers.append(writer)
                writer.write(b"hello\n")
                mark, uid, _ = (await reader.readline()).split(b" ", 2)
                bound[uid.decode()] = (reader, writer, mark.decode())
        assert set(bound) == {"u1", "p1"}, bound
        # Eight later peers claim to be n1; one opens a mark of another node.
        for i, f in enumerate(forged):
            tasks.append(asyncio.create_task(f.run(["n2.aaaaaaaaaaaaa.1"] if i == 1 else [])))
        async with asyncio.timeout(10):
            for f in forged:
                await f.ready.wait()
        for uid in ("u1", "p1"):
            reader, _, mark = bound[uid]
            async with asyncio.timeout(10):
                await server.push(
                    mark, b"pushed to the real client"
                )  # one line: the node adds the newline
                assert await reader.readline() == b"pushed to the real client\n", uid
                await server.close_mark(mark, "kicked")
                rest = await reader.read()
                assert rest == b"", (uid, rest, bound)
        assert server.stats["foreign_opens"] == 1, server.stats
        for f in forged:
            assert not [fr for fr in f.frames if fr.mark], (f.node_id, f.frames)
    finally:
        for w in writers:
            w.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()
