"""Modbus/TCP through a node, driven by pymodbus (a client nobody here wrote).

The node runs ``--framing modbus-tcp`` in front of two instances of the
example server (node/examples/modbus_server.py). Clients read and write
registers in a loop, with no retries (a lost reply would be an error, not a
quiet resend); one instance is SIGKILLed while they do. What a Modbus user
relies on: every request answered, correctly, with no reconnect.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pymodbus.client import AsyncModbusTcpClient

from tests.conftest import Cluster, Upstream
from tests.faults.report import record
from tests.support import ROOT, async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")

SERVER = ROOT / "node" / "examples" / "modbus_server.py"
CLIENTS = 20


def _server(cluster: Cluster, uid: str) -> Upstream:
    return cluster.script(uid, SERVER)


def _expected(address: int, unit: int, count: int) -> list[int]:
    return [((address + i) * 7 + unit) & 0xFFFF for i in range(count)]


async def test_pymodbus_clients_keep_their_connection_through_an_upstream_kill(
    cluster: Cluster,
) -> None:
    m1, m2 = _server(cluster, "m1"), _server(cluster, "m2")
    node = await asyncio.to_thread(
        cluster.node, [f"m1={m1.addr}", f"m2={m2.addr}"], framing="modbus-tcp"
    )
    counts = {"requests": 0, "answered": 0, "wrong": 0, "errors": 0}
    connects: list[bool] = []
    killed = asyncio.Event()
    stop_at = [0.0]

    async def client(i: int) -> None:
        c = AsyncModbusTcpClient(
            "127.0.0.1",
            port=node.port,
            timeout=5,
            retries=0,  # a lost reply must show, not be resent
            reconnect_delay=0.1,
            trace_connect=connects.append,
        )
        assert await c.connect()
        unit = i % 5 + 1
        n = 0
        try:
            while not killed.is_set() or time.monotonic() < stop_at[0]:
                address = (i * 37 + n) % 1000
                n += 1
                counts["requests"] += 1
                try:
                    if n % 3:
                        rr = await c.read_holding_registers(address, count=4, device_id=unit)
                        ok = not rr.isError() and rr.registers == _expected(address, unit, 4)
                    else:
                        rr = await c.write_register(address, n & 0xFFFF, device_id=unit)
                        ok = not rr.isError() and (rr.address, rr.registers) == (
                            address,
                            [n & 0xFFFF],
                        )
                except Exception:  # pymodbus: ModbusIOException, ConnectionException
                    counts["errors"] += 1
                    continue
                counts["answered"] += 1
                counts["wrong"] += not ok
                await asyncio.sleep(0.01)
        finally:
            c.close()

    async with asyncio.timeout(60):
        tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        await async_wait_until(lambda: counts["answered"] >= CLIENTS * 5, 20, "clients going")
        m1.proc.kill()
        stop_at[0] = time.monotonic() + 2.0  # and keep going for 2 s on m2
        killed.set()
        await asyncio.gather(*tasks)
    m = await asyncio.to_thread(node.metrics)
    failovers = int(m["pmlb_failovers_total"])
    record(
        "pymodbus clients, one Modbus/TCP server SIGKILLed",
        connections=CLIENTS,
        held=CLIENTS - (connects.count(True) - CLIENTS),
        sent=counts["requests"],
        lost=counts["requests"] - counts["answered"],
        failovers=failovers,
        note=f"answers wrong {counts['wrong']}; reconnects {connects.count(True) - CLIENTS}",
    )
    assert counts["errors"] == 0, counts
    assert counts["wrong"] == 0, counts
    assert counts["answered"] == counts["requests"]
    assert connects.count(True) == CLIENTS, "no client reconnected"
    assert failovers > 0, "some clients were on the killed server"
    assert m.get('pmlb_connections_closed_total{reason="protocol_error"}', 0) == 0
