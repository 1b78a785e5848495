"""The native link transport's byte work (pmlb.transport._nghttp2) against h2
as the differential oracle.

An h2 server (the pure-Python HTTP/2 library grpclib stands on) and the
native client stream exchange bytes in memory, split at random points: every
gRPC message either sends arrives whole, in order, on the other side; the
receive window is given back only as messages are taken, so the peer is
held to it; oversized messages are dropped without being held; trailers
carry the status; a peer that breaks HTTP/2 gets an error, not a crash.
"""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmlb.transport import ngh2
from tests.support import needs

pytestmark = needs(
    None if ngh2.available() else f"the native link transport: {ngh2.why_not()} (make install)"
)
if ngh2.available():
    from pmlb.transport import _nghttp2

WINDOW = 65_535
MAX_FRAME = 16_384
MAX_MESSAGE = 1 << 20
HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pmlb.v1.Upstream/Bridge"),
    (b":authority", b"oracle"),
    (b"content-type", b"application/grpc+proto"),
    (b"te", b"trailers"),
]


def grpc(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def cut(buf: bytearray) -> list[bytes]:
    """Whole gRPC messages off the front of ``buf`` (the oracle's side)."""
    out = []
    while len(buf) >= 5:
        size = int.from_bytes(buf[1:5], "big")
        if len(buf) < 5 + size:
            break
        out.append(bytes(buf[5 : 5 + size]))
        del buf[: 5 + size]
    return out


class Pair:
    """An h2 server and the native client, wired in memory."""

    def __init__(self, rnd: random.Random, max_message: int = MAX_MESSAGE) -> None:
        self.rnd = rnd
        self.client = _nghttp2.ClientStream(HEADERS, WINDOW, MAX_FRAME, max_message)
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.server.initiate_connection()
        self.sid: int | None = None
        self.request: dict[str, str] = {}
        self.server_got = bytearray()
        self.client_ended = False
        self.server_out = bytearray()  # what h2 queued that the window did not allow yet

    def pump(self) -> None:
        """Move bytes both ways, in random pieces, until both are quiet."""
        for _ in range(10_000):
            moved = False
            out = b"".join(self.client.output())
            if out:
                moved = True
                self._server_receive(out)
            data = self.server.data_to_send()
            if data:
                moved = True
                view = memoryview(data)
                while view:
                    n = self.rnd.randint(1, max(1, len(view)))
                    self.client.receive(bytes(view[:n]))
                    view = view[n:]
            moved |= self._flush_server()
            if not moved:
                return
        raise AssertionError("the pair never went quiet")

    def _server_receive(self, data: bytes) -> None:
        for ev in self.server.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.sid = ev.stream_id
                self.request = {k: v for k, v in ev.headers}  # type: ignore[misc]
                self.server.send_headers(
                    ev.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
                )
            elif isinstance(ev, h2.events.DataReceived):
                self.server_got += ev.data
                self.server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.client_ended = True

    def send_from_server(self, payload: bytes) -> None:
        self.server_out += payload
        self._flush_server()

    def _flush_server(self) -> bool:
        """As much of server_out as h2's windows allow, in random frame sizes."""
        sent = False
        assert self.sid is not None
        while self.server_out:
            room = min(
                self.server.local_flow_control_window(self.sid),
                self.server.max_outbound_frame_size,
            )
            if room <= 0:
                break
            n = self.rnd.randint(1, min(room, len(self.server_out)))
            self.server.send_data(self.sid, bytes(self.server_out[:n]))
            del self.server_out[:n]
            sent = True
        return sent

    def take_all(self) -> list[bytes | None]:
        got = []
        while (m := self.client.take()) is not None:
            data, size = m
            self.client.consume(size)
            got.append(data)
        return got


messages = st.lists(st.binary(max_size=300) | st.integers(0, 200_000), max_size=12)


def _bytes(spec: bytes | int, rnd: random.Random) -> bytes:
    return spec if isinstance(spec, bytes) else rnd.randbytes(spec)


@settings(max_examples=60, deadline=None)
@given(up=messages, down=messages, seed=st.integers(0, 2**32))
def test_messages_cross_whole_and_in_order_both_ways(
    up: list[bytes | int], down: list[bytes | int], seed: int
) -> None:
    rnd = random.Random(seed)
    pair = Pair(rnd)
    pair.pump()
    assert pair.request[":path"] == "/pmlb.v1.Upstream/Bridge"
    assert pair.request["te"] == "trailers"
    sent_up = [_bytes(m, rnd) for m in up]
    for m in sent_up:
        pair.client.send(m)
    pair.client.end()
    sent_down = [_bytes(m, rnd) for m in down]
    pair.send_from_server(b"".join(grpc(m) for m in sent_down))
    got_down: list[bytes | None] = []
    for _ in range(1000):
        pair.pump()
        # Taking messages is what gives the window back: the oracle can
        # send more than WINDOW bytes only because we take them.
        got_down += pair.take_all()
        if not pair.server_out and pair.client.take() is None and not pair.client.partial():
            pair.pump()
            if not pair.server_out:
                break
    assert got_down == sent_down
    assert cut(pair.server_got) == sent_up
    assert pair.server_got == bytearray()  # nothing left over
    assert pair.client_ended
    assert pair.client.queued == 0
    assert pair.sid is not None
    pair.server.send_headers(pair.sid, [("grpc-status", "0")], end_stream=True)
    pair.pump()
    assert pair.client.ended
    assert pair.client.closed
    assert pair.client.trailers == {"grpc-status": "0"}


def test_an_unread_stream_holds_no_more_than_its_window() -> None:
    pair = Pair(random.Random(1))
    pair.pump()
    pair.send_from_server(grpc(b"x" * 1000) * 1000)  # 1 MB, never taken
    pair.pump()
    assert len(pair.server_out) >= 1_005_000 - WINDOW  # the rest waits at the peer
    held = 0
    while (m := pair.client.take()) is not None:
        held += m[1]  # taken but not consumed: the window stays closed
    assert held <= WINDOW
    pair.pump()
    assert pair.client.take() is None


def test_a_window_of_empty_messages_waits_as_bytes_not_objects() -> None:
    """The per-message cost is bounded too: a peer filling the window with
    empty messages leaves at most MAX_PENDING of them cut and waiting; the
    rest stay bytes (their window not given back) and all arrive, in order,
    as they are taken."""
    pair = Pair(random.Random(6))
    pair.pump()
    total = 20_000  # 100 KB of 5-byte messages: more than the window
    pair.send_from_server(grpc(b"") * total)
    pair.pump()
    assert pair.client.pending() == _nghttp2.MAX_PENDING
    assert len(pair.server_out) >= total * 5 - WINDOW  # the peer is held to its window
    got = 0
    for _ in range(1000):
        while (m := pair.client.take()) is not None:
            assert m[0] == b""
            pair.client.consume(m[1])
            got += 1
            assert pair.client.pending() <= _nghttp2.MAX_PENDING
        pair.pump()
        if got == total:
            break
    assert got == total
    assert not pair.client.partial()


def test_an_oversized_message_is_dropped_as_it_arrives_and_the_next_one_arrives() -> None:
    pair = Pair(random.Random(2), max_message=1000)
    pair.pump()
    pair.send_from_server(b"\0" + (200_000).to_bytes(4, "big") + b"y" * 200_000 + grpc(b"next"))
    got: list[bytes | None] = []
    for _ in range(100):
        pair.pump()
        got += pair.take_all()
        if len(got) == 2:
            break
    assert got == [None, b"next"]
    assert pair.client.dropped == 1
    assert not pair.client.partial()


def test_a_refusal_status_and_message_reach_the_client() -> None:
    pair = Pair(random.Random(3))
    pair.pump()
    assert pair.sid is not None
    pair.server.send_headers(
        pair.sid,
        [("grpc-status", "16"), ("grpc-message", "bad%20token")],
        end_stream=True,
    )
    pair.pump()
    assert pair.client.ended
    assert pair.client.trailers == {"grpc-status": "16", "grpc-message": "bad%20token"}


def test_a_stream_reset_is_reported_with_its_code() -> None:
    pair = Pair(random.Random(4))
    pair.pump()
    assert pair.sid is not None
    pair.server.reset_stream(pair.sid, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
    pair.pump()
    assert pair.client.closed
    assert not pair.client.ended
    assert pair.client.reset_code == 7
    assert "REFUSED_STREAM" in pair.client.describe_code(7)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # not a frame
        b"\x00\x00\x04\x09\x00\x00\x00\x00\x01abcd",  # CONTINUATION out of nowhere
        b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"p" * 8,  # PING on a stream
    ],
)
def test_a_peer_that_breaks_http2_gets_an_error_not_a_crash(garbage: bytes) -> None:
    pair = Pair(random.Random(5))
    pair.pump()
    pair.client.receive(garbage)
    # What goes back is a GOAWAY saying why, which h2 reads as the end, and
    # the stream says the connection is done.
    events = pair.server.receive_data(b"".join(pair.client.output()))
    ended = [ev for ev in events if isinstance(ev, h2.events.ConnectionTerminated)]
    assert ended
    assert ended[0].error_code != 0
    assert pair.client.local_error == ended[0].error_code
