"""The checker's hysteresis at its defaults (--check-rise 2, --check-fall 2):
an upstream's health in etcd flips only after two probe answers in a row say
so, counted by the upstream's own health server (each answer time-stamped)
against the time the checker wrote the flip."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Cluster, Etcd
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CountingHealth(health_pb2_grpc.HealthServicer):
    """Answers Check with ``status``; keeps (wall time, answer) of each."""

    def __init__(self) -> None:
        self.status = SERVING
        self.answers: list[tuple[float, int]] = []

    async def Check(  # the gRPC method's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.answers.append((time.time(), self.status))
        return health_pb2.HealthCheckResponse(status=self.status)


def _written(raw: str | None) -> tuple[str, float]:
    """(status, when) of the checker's health value."""
    value = json.loads(raw or "{}")
    when = datetime.fromisoformat(value["since"].replace("Z", "+00:00")).timestamp()
    return value["status"], when


async def test_health_flips_after_two_answers_in_a_row(etcd: Etcd, cluster: Cluster) -> None:
    health = CountingHealth()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    key = "/services/echo/health/u1"
    try:
        etcd.put("/services/echo/upstreams/u1", f"127.0.0.1:{port}")
        await asyncio.to_thread(
            cluster.node,
            [],
            etcd=etcd.url,
            prefix=etcd.prefix,
            wait_links=[],  # no Bridge here: only the checker's probes matter
            rise_fall=None,  # the defaults
        )
        async with asyncio.timeout(30):
            await async_wait_until(lambda: etcd.get(key) is not None, 10, "first health")
            assert _written(etcd.get(key))[0] == "SERVING"
            for now, word in ((NOT_SERVING, "NOT_SERVING"), (SERVING, "SERVING")):
                flipped_at = time.time()
                health.status = now
                await async_wait_until(
                    lambda word=word: _written(etcd.get(key))[0] == word, 10, f"{word} written"
                )
                _, written_at = _written(etcd.get(key))
                seen = [s for t, s in health.answers if flipped_at <= t <= written_at + 0.001]
                # Exactly two answers of the new status before the write.
                assert seen.count(now) == 2, (word, seen)
    finally:
        await server.stop(0)
