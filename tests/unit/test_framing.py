"""Framing codecs: whole messages out of arbitrary reads, limits enforced."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmlb.dataplane.framing import encoder_for, make_decoder
from pmlb.errors import ConfigError, FrameTooLarge, FramingError


def _wire(framing: str, msgs: list[bytes]) -> bytes:
    if framing == "line":
        return b"".join(m + b"\n" for m in msgs)
    fmt = ">H" if framing == "len16" else ">I"
    return b"".join(struct.pack(fmt, len(m)) + m for m in msgs)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("framing", ["line", "len16", "len32"])
@given(
    msgs=st.lists(st.binary(max_size=300), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=40),
)
def test_any_split_of_the_stream_yields_the_same_messages(
    framing: str, msgs: list[bytes], cuts: list[int]
) -> None:
    if framing == "line":
        msgs = [m.replace(b"\n", b"") for m in msgs]
    data = _wire(framing, msgs)
    dec = make_decoder(framing, 1000)
    out: list[bytes] = []
    for piece in _split(data, cuts):
        out += dec.feed(piece)
    assert out == msgs
    assert dec.pending == 0


def test_line_keeps_partial_until_newline() -> None:
    dec = make_decoder("line", 100)
    assert dec.feed(b"hel") == []
    assert dec.pending == 3
    assert dec.feed(b"lo\nwor") == [b"hello"]
    assert dec.feed(b"ld\r\n\n") == [b"world\r", b""]


def test_coalesced_read_gives_every_message() -> None:
    dec = make_decoder("len16", 100)
    assert dec.feed(_wire("len16", [b"a", b"", b"bc" * 10])) == [b"a", b"", b"bc" * 10]


@pytest.mark.parametrize("framing", ["line", "len16", "len32"])
def test_oversized_message_raises(framing: str) -> None:
    dec = make_decoder(framing, 10)
    assert dec.feed(_wire(framing, [b"x" * 10])) == [b"x" * 10]
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(_wire(framing, [b"y" * 11]))
    assert info.value.limit == 10


def test_line_over_limit_without_newline_raises_early() -> None:
    dec = make_decoder("line", 10)
    dec.feed(b"x" * 10)
    with pytest.raises(FrameTooLarge):
        dec.feed(b"x")


def test_length_prefix_over_limit_raises_on_the_header_alone() -> None:
    # A client announcing 4 GiB must be refused before we buffer anything.
    dec = make_decoder("len32", 1024)
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 2**32 - 1))


def test_raw_splits_at_the_limit() -> None:
    dec = make_decoder("raw", 4)
    assert dec.feed(b"abcdefghij") == [b"abcd", b"efgh", b"ij"]
    assert dec.feed(b"") == []


@pytest.mark.parametrize("framing", ["raw", "line", "len16", "len32"])
@given(msg=st.binary(max_size=2000))
def test_encode_then_decode_round_trips(framing: str, msg: bytes) -> None:
    if framing == "line":
        msg = msg.replace(b"\n", b"")
    if framing == "raw" and not msg:
        return
    dec = make_decoder(framing, 4096)
    assert dec.feed(encoder_for(framing)(msg)) == [msg]


def test_len16_cannot_carry_more_than_65535() -> None:
    with pytest.raises(FrameTooLarge):
        encoder_for("len16")(b"x" * 65536)
    with pytest.raises(ConfigError):
        make_decoder("len16", 70000)


def test_unknown_framing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown framing"):
        make_decoder("xml", 10)


# -- length-field, delimiter, the protocol presets, STOMP ---------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _modbus(tid: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu


def _smpp(command: int, body: bytes) -> bytes:
    return struct.pack(">IIII", 16 + len(body), command, 0, 7) + body


def _stomp(command: str, headers: dict[str, str], body: bytes, length: bool) -> bytes:
    lines = [command] + [f"{k}:{v}" for k, v in headers.items()]
    if length:
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode() + body + b"\x00"


@given(
    msgs=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=400)), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=40),
)
def test_mqtt_packets_come_whole_however_the_stream_is_cut(
    msgs: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    packets = [_mqtt(kind, body) for kind, body in msgs]
    dec = make_decoder("mqtt", 1000)
    out: list[bytes] = []
    for chunk in _split(b"".join(packets), cuts):
        out += dec.feed(chunk)
    assert out == packets, "whole packets, header included, unchanged"
    assert dec.pending == 0


@pytest.mark.parametrize(
    ("framing", "make"),
    [
        ("modbus-tcp", lambda i, b: _modbus(i, b[:250])),
        ("smpp", lambda i, b: _smpp(0x80000000 | i, b)),
        ("stomp", lambda i, b: _stomp("SEND", {"destination": f"/q/{i}"}, b, True)),
        ("delimiter:hex=0d0a,keep=yes", lambda i, b: b.replace(b"\r", b"") + b"\r\n"),
    ],
)
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=15),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=40),
)
def test_protocol_messages_come_whole_however_the_stream_is_cut(
    framing: str, make: object, bodies: list[bytes], cuts: list[int]
) -> None:
    msgs = [make(i, b) for i, b in enumerate(bodies)]  # type: ignore[operator]
    dec = make_decoder(framing, 1000)
    out: list[bytes] = []
    for chunk in _split(b"".join(msgs), cuts):
        out += dec.feed(chunk)
    assert out == msgs
    assert encoder_for(framing)(msgs[0] if msgs else b"x") == (msgs[0] if msgs else b"x"), (
        "what an upstream sends is written unchanged"
    )


def test_stomp_frames_with_nul_bodies_heartbeats_and_trailing_eols() -> None:
    a = _stomp("SEND", {"destination": "/q"}, b"has\x00nul", True)
    b = _stomp("SEND", {"destination": "/q"}, b"no length", False)
    stream = b"\n" + a + b"\r\n" + b + b"\n\n"
    assert make_decoder("stomp", 1000).feed(stream) == [b"\n", a, b"\r\n", b, b"\n", b"\n"]
    dec = make_decoder("stomp", 1000)
    out = [m for byte in stream for m in dec.feed(bytes([byte]))]
    assert out == [b"\n", a, b"\r\n", b, b"\n", b"\n"], "byte by byte too"


@pytest.mark.parametrize(
    ("framing", "data", "words"),
    [
        ("mqtt", b"\x30\xff\xff\xff\xff\x01", "varint"),
        ("smpp", struct.pack(">I", 3) + b"\x00" * 12, "shorter than its header"),
        ("stomp", b"SEND\ncontent-length:x\n\nbody\x00", "not a number"),
        ("stomp", b"SEND\ncontent-length:2\n\nbodyX", "no NUL"),
        ("stomp", b"\rX", "carriage return"),
    ],
)
def test_input_that_breaks_the_rule_is_a_framing_error(
    framing: str, data: bytes, words: str
) -> None:
    with pytest.raises(FramingError, match=words):
        make_decoder(framing, 1000).feed(data)


@pytest.mark.parametrize(
    ("framing", "data"),
    [
        ("mqtt", b"\x30" + _varint(5000)),
        ("modbus-tcp", struct.pack(">HHH", 1, 0, 4000)),
        ("smpp", struct.pack(">I", 5000)),
        ("stomp", b"SEND\n" + b"h:" + b"x" * 2000),
        ("stomp", b"SEND\ncontent-length:5000\n\n"),
        ("delimiter:text=END", b"y" * 1100),
        ("length-field:size=3,order=little,strip=3", (5000).to_bytes(3, "little")),
    ],
)
def test_an_oversized_message_is_refused_from_its_header_or_at_the_limit(
    framing: str, data: bytes
) -> None:
    """Memory stays bounded by the maximum frame size: no decoder waits for
    (or holds) more than one message of at most that size."""
    with pytest.raises(FrameTooLarge):
        make_decoder(framing, 1000).feed(data)


def test_a_stripped_length_field_is_put_back_on_what_upstreams_send() -> None:
    framing = "length-field:size=3,order=little,adjust=2,strip=3"
    dec = make_decoder(framing, 1000)
    wire = (5 - 2).to_bytes(3, "little") + b"hello"
    assert dec.feed(wire) == [b"hello"]
    assert encoder_for(framing)(b"hello") == wire
    assert encoder_for("delimiter:text=\\r\\n")(b"hi") == b"hi\r\n"
    assert make_decoder("delimiter:text=\\r\\n", 10).feed(b"a\r\nb\r") == [b"a"]


@pytest.mark.parametrize(
    ("framing", "words"),
    [
        ("length-field:size=5", "size must be 1, 2, 3, 4, 8 or varint"),
        ("length-field:offset=2,size=2,strip=4", "strip must be 0"),
        ("length-field:size=varint,strip=1", "strip must be 0"),
        ("length-field:offst=2", "'offst=2' is not one of"),
        ("length-field:adjust=x", "adjust='x' is not a number"),
        ("length-field:order=middle", "order must be big or little"),
        ("delimiter:keep=yes", "hex=... or text=..."),
        ("delimiter:hex=zz", "bad delimiter"),
        ("plugin:nope", "no plug-in 'nope'"),
        ("mqqt", "unknown framing 'mqqt'"),
    ],
)
def test_a_bad_framing_setting_is_one_clear_error(framing: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make_decoder(framing, 1000)
