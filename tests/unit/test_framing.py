"""Framing codecs: whole messages out of arbitrary reads, limits enforced."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmlb.dataplane.framing import encoder_for, make_decoder
from pmlb.errors import ConfigError, FrameTooLarge


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
