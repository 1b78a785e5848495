"""A framing no setting describes, as a plug-in: RESP, driven by redis-py.

The decoder (node/examples/resp_framing.py) is found the way a user's would
be: through the ``pmlb.framings`` entry point of a distribution installed
beside pmlb (here, its metadata on the node's PYTHONPATH). redis-py clients,
with retries off, pipeline ECHO commands through the node to two instances of
node/examples/resp_server.py; one is SIGKILLed while they do. Every reply
must come back, in order, on the same connection.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pmlb.errors import FramingError
from tests.conftest import Cluster, Upstream
from tests.faults.report import record
from tests.support import ROOT, async_wait_until

EXAMPLES = ROOT / "node" / "examples"
CLIENTS = 10
PIPELINE = 40

sys.path.insert(0, str(EXAMPLES))
from resp_framing import RespDecoder  # noqa: E402


def _bulk(word: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(word), word)


def _command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(map(_bulk, words))


@given(
    commands=st.lists(st.lists(st.binary(max_size=50), min_size=1, max_size=4), max_size=20),
    step=st.integers(min_value=1, max_value=64),
)
def test_pipelined_commands_come_whole_however_they_are_cut(
    commands: list[list[bytes]], step: int
) -> None:
    wire = [_command(*words) for words in commands] + [b"PING\r\n"]
    stream = b"".join(wire)
    dec = RespDecoder(4096)
    out = [m for i in range(0, len(stream), step) for m in dec.feed(stream[i : i + step])]
    assert out == wire
    assert dec.pending == 0
    with pytest.raises(FramingError):
        RespDecoder(4096).feed(b"*x\r\n")


def _install_plugin(tmp: Path) -> str:
    """The metadata a pip install of a package with this entry point leaves."""
    dist = tmp / "site" / "resp_example-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: resp-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pmlb.framings]\nresp = resp_framing:RespDecoder\n")
    return os.pathsep.join([str(tmp / "site"), str(EXAMPLES)])


def _server(cluster: Cluster, uid: str) -> Upstream:
    return cluster.script(uid, EXAMPLES / "resp_server.py")


@pytest.mark.asyncio(loop_scope="function")
async def test_redis_clients_keep_their_connection_through_an_upstream_kill(
    cluster: Cluster, tmp_path: Path
) -> None:
    path = _install_plugin(tmp_path)
    r1, r2 = _server(cluster, "r1"), _server(cluster, "r2")
    node = await asyncio.to_thread(
        cluster.node,
        [f"r1={r1.addr}", f"r2={r2.addr}"],
        framing="plugin:resp",
        env={"PYTHONPATH": path},
    )
    counts = {"sent": 0, "answered": 0, "wrong": 0, "errors": 0}
    killed = asyncio.Event()
    stop_at = [0.0]

    async def client(i: int) -> None:
        r = aioredis.Redis(
            host="127.0.0.1",
            port=node.port,
            single_connection_client=True,
            retry=Retry(NoBackoff(), 0),  # a lost reply must show, not be resent
            socket_timeout=5,
        )
        n = 0
        try:
            assert await r.ping()
            while not killed.is_set() or time.monotonic() < stop_at[0]:
                pipe = r.pipeline(transaction=False)
                words = [f"c{i}-{n}-{k}".encode() for k in range(PIPELINE)]
                n += 1
                for w in words:
                    pipe.echo(w)
                counts["sent"] += PIPELINE
                try:
                    replies = await pipe.execute()
                except Exception:  # redis.ConnectionError, TimeoutError
                    counts["errors"] += 1
                    return
                counts["answered"] += len(replies)
                counts["wrong"] += sum(a != b for a, b in zip(replies, words, strict=True))
                await asyncio.sleep(0.01)
        finally:
            await r.aclose()

    async with asyncio.timeout(60):
        tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        await async_wait_until(lambda: counts["answered"] >= CLIENTS * PIPELINE, 20, "going")
        r1.proc.kill()
        stop_at[0] = time.monotonic() + 2.0
        killed.set()
        await asyncio.gather(*tasks)
    m = await asyncio.to_thread(node.metrics)
    record(
        "redis-py pipelines, RESP as a framing plug-in, one server SIGKILLed",
        connections=CLIENTS,
        held=CLIENTS - counts["errors"],
        sent=counts["sent"],
        lost=counts["sent"] - counts["answered"],
        failovers=int(m["pmlb_failovers_total"]),
        note=f"replies wrong {counts['wrong']}",
    )
    assert counts["errors"] == 0, counts
    assert counts["wrong"] == 0, counts
    assert counts["answered"] == counts["sent"]
    assert m["pmlb_failovers_total"] > 0, "some clients were on the killed server"
    assert m.get('pmlb_connections_closed_total{reason="protocol_error"}', 0) == 0
