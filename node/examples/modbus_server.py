"""A Modbus/TCP server behind pmlb: an upstream written with the Python SDK.

Run the node with ``--framing modbus-tcp``: every Data frame is then one whole
Modbus/TCP ADU (the 7-byte MBAP header and the PDU), and what this upstream
sends back is written to the client unchanged, so any Modbus client library
works through the node, and a failover never splits a request.

The register bank is computed, not stored (a stateless upstream: real state
would live in a database every instance reaches), so any instance answers any
request the same way:

* 0x03 read holding registers: register ``a`` of unit ``u`` holds
  ``(a * 7 + u) & 0xFFFF``;
* 0x06 write single register and 0x10 write multiple registers: accepted and
  answered as the standard says (the value is not kept);
* any other function: exception 0x01 (illegal function); a malformed PDU:
  exception 0x03 (illegal data value).

    python node/examples/modbus_server.py --listen 127.0.0.1:5020 --id m1
"""

from __future__ import annotations

import argparse
import asyncio
import struct

from pmlb.upstream import Conn, Handler, UpstreamServer

MAX_READ = 125  # registers in one read (the standard's limit)


def register(address: int, unit: int) -> int:
    return (address * 7 + unit) & 0xFFFF


def answer(adu: bytes) -> bytes | None:
    """The response ADU to one request ADU (None: not a Modbus/TCP ADU)."""
    if len(adu) < 8:
        return None
    tid, protocol, _length, unit = struct.unpack_from(">HHHB", adu)
    if protocol != 0:
        return None
    function, data = adu[7], adu[8:]

    def reply(pdu: bytes) -> bytes:
        return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu

    def error(code: int) -> bytes:
        return reply(bytes([function | 0x80, code]))

    if function == 0x03:
        if len(data) != 4:
            return error(0x03)
        start, count = struct.unpack(">HH", data)
        if not 1 <= count <= MAX_READ or start + count > 0x10000:
            return error(0x03)
        values = [register(start + i, unit) for i in range(count)]
        return reply(struct.pack(f">BB{count}H", function, 2 * count, *values))
    if function == 0x06:
        return reply(adu[7:12]) if len(data) == 4 else error(0x03)
    if function == 0x10:
        if len(data) < 5:
            return error(0x03)
        start, count, size = struct.unpack_from(">HHB", data)
        if size != 2 * count or len(data) != 5 + size:
            return error(0x03)
        return reply(struct.pack(">BHH", function, start, count))
    return error(0x01)


class ModbusHandler(Handler):
    def on_message(self, conn: Conn, data: bytes) -> None:
        response = answer(data)
        if response is None:
            conn.close("protocol_error")
            return
        conn.send(response)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:5020", help="HOST:PORT for the Bridge")
    parser.add_argument("--id", default="modbus", help="this upstream's id")
    args = parser.parse_args()
    server = UpstreamServer(ModbusHandler(), upstream_id=args.id, listen=args.listen)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(main())
