"""A stateless MQTT 3.1.1 broker behind pmlb, written with the Python SDK.

Run any number of instances as the upstreams of one service, and the node with
``--framing mqtt --push-upstreams '*'``::

    python node/examples/mqtt/broker.py --listen 127.0.0.1:7101 --id m1
    python node/examples/mqtt/broker.py --listen 127.0.0.1:7102 --id m2
    pmlb node --framing mqtt --push-upstreams '*' --listen 127.0.0.1:1883 \\
        --upstream m1=127.0.0.1:7101 --upstream m2=127.0.0.1:7102

Unmodified MQTT clients (paho-mqtt, mosquitto_pub/sub) connect to the node.
The ``mqtt`` framing makes every Data frame one whole MQTT packet, so a
failover never splits one, and the node replays the packets a dead instance
had not acknowledged to the next one.

Nothing is kept in an instance. What a connection needs lives in its mark's
metadata, which the node keeps and hands to whichever instance the mark is
bound to next: ``mqtt.client`` (the client id, set by CONNECT) and
``mqtt.subs`` (its subscriptions, one ``filter<TAB>qos`` per line). Every
instance watches the node's marks (``watch_marks=True``), so it knows every
subscriber, bound to it or not, and pushes to them (the node's
``--push-upstreams`` lets it).

A QoS 1 PUBLISH is answered (PUBACK) only once the node has accepted the
fan-out (``push`` futures), so a PUBACK means the message is in every
subscriber's connection. The fan-out and a marker in the publisher's metadata
(``mqtt.fanout``: the seq of the last publish fanned out) go to the node in
one Batch (``server.atomic()``), which the node applies whole or not at all.
An instance killed after the fan-out but before its PUBACK reached the node
leaves the marker set: the replayed PUBLISH is then only acknowledged, not
fanned out again. That makes delivery exactly once to subscribers on the
publisher's node; to subscribers on other nodes it is at least once.

Supported: CONNECT (protocol level 4, clean or not: no session is kept, so
CONNACK says "no session present"), PUBLISH at QoS 0 and 1, SUBSCRIBE (QoS
granted up to 1) with ``+`` and ``#`` wildcards, UNSUBSCRIBE, PINGREQ,
DISCONNECT. Not supported: QoS 2 (the connection is closed), retained
messages and wills (ignored), persistent sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import zlib
from collections.abc import Iterator, Mapping

from pmlb.errors import PushRefused
from pmlb.upstream import Conn, Handler, UpstreamServer

log = logging.getLogger("mqtt-broker")

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

CLIENT, SUBS, FANOUT = "mqtt.client", "mqtt.subs", "mqtt.fanout"


class Malformed(ValueError):
    """A packet this broker cannot accept: the connection is closed."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


class Reader:
    """The variable header and payload of one packet."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise Malformed("packet too short")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise Malformed("packet too short")
        (v,) = struct.unpack_from(">H", self.data, self.pos)
        self.pos += 2
        return int(v)

    def string(self) -> str:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise Malformed("string past the end of the packet")
        self.pos += n
        try:
            return self.data[self.pos - n : self.pos].decode()
        except UnicodeDecodeError:
            raise Malformed("string is not UTF-8") from None

    def rest(self) -> bytes:
        return self.data[self.pos :]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def split(message: bytes) -> tuple[int, int, Reader]:
    """(type, flags, reader of the rest) of one whole packet (the framing's)."""
    if len(message) < 2:
        raise Malformed("packet too short")
    pos, length, shift = 1, 0, 0
    while True:
        if pos >= len(message) or pos > 4:
            raise Malformed("bad remaining length")
        b = message[pos]
        length |= (b & 0x7F) << shift
        shift += 7
        pos += 1
        if not b & 0x80:
            break
    if pos + length != len(message):
        raise Malformed("remaining length does not match the packet")
    return message[0] >> 4, message[0] & 0x0F, Reader(message[pos:])


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic matching: ``+`` one level, ``#`` the rest."""
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False  # $SYS-style topics are not matched by leading wildcards
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def subscriptions(metadata: Mapping[str, str]) -> dict[str, int]:
    text = metadata.get(SUBS, "")
    subs: dict[str, int] = {}
    for line in text.splitlines():
        f, _, qos = line.partition("\t")
        subs[f] = int(qos or 0)
    return subs


def encode_subs(subs: dict[str, int]) -> str:
    return "\n".join(f"{f}\t{q}" for f, q in sorted(subs.items()))


class Broker(Handler):
    def __init__(self) -> None:
        self.server: UpstreamServer | None = None
        self.stats = {"publishes": 0, "deliveries": 0, "replays_acknowledged": 0}

    def on_open(self, conn: Conn) -> None:
        if conn.resumed:
            log.info("mark=%s resumed here (client %s)", conn.mark, conn.metadata.get(CLIENT))

    async def on_message(self, conn: Conn, data: bytes) -> None:
        try:
            kind, flags, r = split(data)
            await self._handle(conn, kind, flags, r)
        except Malformed as exc:
            log.warning("mark=%s malformed packet: %s; closing", conn.mark, exc)
            conn.close("protocol_error", str(exc))

    async def _handle(self, conn: Conn, kind: int, flags: int, r: Reader) -> None:
        if kind == CONNECT:
            await self._connect(conn, r)
            return
        if CLIENT not in conn.metadata:
            raise Malformed(f"packet type {kind} before CONNECT")
        if kind == PUBLISH:
            await self._publish(conn, flags, r)
        elif kind == PUBACK:
            pass  # a subscriber acknowledging a delivery: nothing is kept to retry
        elif kind == SUBSCRIBE:
            await self._subscribe(conn, flags, r)
        elif kind == UNSUBSCRIBE:
            await self._unsubscribe(conn, flags, r)
        elif kind == PINGREQ:
            conn.send(packet(PINGRESP, 0, b""))
        elif kind == DISCONNECT:
            conn.close("client_disconnect")
        else:
            raise Malformed(f"unsupported packet type {kind}")

    async def _connect(self, conn: Conn, r: Reader) -> None:
        if CLIENT in conn.metadata:
            raise Malformed("a second CONNECT")
        name, level = r.string(), r.u8()
        if name != "MQTT" or level != 4:
            conn.send(packet(CONNACK, 0, b"\x00\x01"))  # unacceptable protocol version
            conn.close("protocol_error", f"protocol {name!r} level {level}")
            return
        flags = r.u8()
        r.u16()  # keep alive: the client's PINGREQs keep the connection busy enough
        client_id = r.string() or conn.mark
        conn.set_meta({CLIENT: client_id})
        await conn.accepted()
        conn.send(packet(CONNACK, 0, b"\x00\x00"))
        log.info("mark=%s CONNECT client %s (flags 0x%02x)", conn.mark, client_id, flags)

    async def _subscribe(self, conn: Conn, flags: int, r: Reader) -> None:
        if flags != 0x2:
            raise Malformed("SUBSCRIBE flags must be 0x2")
        pid = r.u16()
        subs = subscriptions(conn.metadata)
        granted = bytearray()
        while r.left:
            f, qos = r.string(), r.u8()
            if not f or qos > 2:
                raise Malformed("bad topic filter or QoS")
            subs[f] = min(qos, 1)
            granted.append(min(qos, 1))
        if not granted:
            raise Malformed("SUBSCRIBE without a topic filter")
        conn.set_meta({SUBS: encode_subs(subs)})
        # SUBACK only once the node holds the subscription (and has told
        # every watching instance): a publish after it sees this subscriber.
        await conn.accepted()
        conn.send(packet(SUBACK, 0, struct.pack(">H", pid) + bytes(granted)))

    async def _unsubscribe(self, conn: Conn, flags: int, r: Reader) -> None:
        if flags != 0x2:
            raise Malformed("UNSUBSCRIBE flags must be 0x2")
        pid = r.u16()
        subs = subscriptions(conn.metadata)
        while r.left:
            subs.pop(r.string(), None)
        conn.set_meta({SUBS: encode_subs(subs)})
        await conn.accepted()
        conn.send(packet(UNSUBACK, 0, struct.pack(">H", pid)))

    def _targets(self, topic: str) -> Iterator[tuple[str, int]]:
        assert self.server is not None
        for mark, info in self.server.marks.items():
            best = -1
            for f, qos in subscriptions(info.metadata).items():
                if qos > best and matches(f, topic):
                    best = qos
            if best >= 0:
                yield mark, best

    async def _publish(self, conn: Conn, flags: int, r: Reader) -> None:
        qos = (flags >> 1) & 0x3
        if qos > 1:
            raise Malformed("QoS 2 is not supported by this broker")
        topic = r.string()
        if not topic or "+" in topic or "#" in topic:
            raise Malformed("bad topic name")
        pid = r.u16() if qos else 0
        payload = r.rest()
        server = self.server
        assert server is not None
        self.stats["publishes"] += 1
        if conn.seq <= int(conn.metadata.get(FANOUT, "0")):
            # Replayed: this publish was fanned out before the last instance
            # died (the marker came in the same Batch as the pushes).
            self.stats["replays_acknowledged"] += 1
        else:
            # One packet id per (publisher, message), the same on every instance.
            out_pid = 1 + zlib.crc32(f"{conn.mark}/{conn.seq}".encode()) % 0xFFFF
            sent = []
            with server.atomic():
                for mark, sub_qos in self._targets(topic):
                    q = min(qos, sub_qos)
                    body = utf8(topic) + (struct.pack(">H", out_pid) if q else b"") + payload
                    sent.append(server.push(mark, packet(PUBLISH, q << 1, body)))
                conn.set_meta({FANOUT: str(conn.seq)})
                marker = conn.accepted()  # confirmed by the same round trip
            results = await asyncio.gather(*sent, return_exceptions=True)
            for x in results:
                if isinstance(x, PushRefused) and x.reason == "unconfirmed":
                    # A node's link ended before it confirmed: no PUBACK (the
                    # client publishes again, at least once), and no claim
                    # that it was delivered.
                    raise x
            # A subscriber that left meanwhile (MarkGone) is no loss.
            self.stats["deliveries"] += sum(1 for x in results if x is None)
            await marker
        if qos:
            conn.send(packet(PUBACK, 0, struct.pack(">H", pid)))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:7101", help="HOST:PORT to serve the Bridge on")
    p.add_argument("--id", default="m1", help="this instance's upstream id")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s mqtt/%(name)s: %(message)s"
    )
    broker = Broker()
    server = UpstreamServer(broker, upstream_id=args.id, listen=args.listen, watch_marks=True)
    broker.server = server
    await server.start()
    log.info("MQTT broker %s on %s", args.id, args.listen)
    await server.wait()


if __name__ == "__main__":
    asyncio.run(main())
