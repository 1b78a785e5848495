"""PROXY protocol parsing: round trips, any split, garbage never escapes as anything
but BadProxyHeader."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmlb.dataplane import proxyproto
from pmlb.dataplane.proxyproto import BadProxyHeader, ProxyHeader, parse

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)


@given(
    src=ipv4 | ipv6,
    dst=ipv4 | ipv6,
    sport=ports,
    dport=ports,
    tail=st.binary(max_size=50),
    v=st.sampled_from([1, 2]),
    cut=st.integers(0, 200),
)
def test_round_trip_any_split(
    src: str, dst: str, sport: int, dport: int, tail: bytes, v: int, cut: int
) -> None:
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        dst = src
    header = (proxyproto.v1 if v == 1 else proxyproto.v2)(src, sport, dst, dport)
    data = header + tail
    cut = min(cut, len(header) - 1)
    assert parse(data[:cut]) == (None, 0), "incomplete headers wait for more"
    parsed, used = parse(data)
    assert used == len(header)
    assert parsed == ProxyHeader(src, sport, dst, dport)


@given(st.binary(max_size=300))
def test_garbage_only_ever_raises_bad_header(data: bytes) -> None:
    with contextlib.suppress(BadProxyHeader):
        parse(data)


@given(st.binary(max_size=120))
def test_garbage_after_a_v2_signature(data: bytes) -> None:
    with contextlib.suppress(BadProxyHeader):
        parse(proxyproto.V2_SIG + data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 ::1 80 443\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n", "port"),
        (b"PROXY " + b"x" * 120, "107"),
        (proxyproto.V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12, "version"),
        (proxyproto.V2_SIG + b"\x21\x11\xff\xff", "too long"),
        (proxyproto.V2_SIG + b"\x21\x11\x00\x04" + b"\x00" * 4, "too short"),
    ],
)
def test_bad_headers_are_named(data: bytes, why: str) -> None:
    with pytest.raises(BadProxyHeader, match=why):
        parse(data)


def test_local_and_unknown_keep_the_connection_address() -> None:
    assert parse(b"PROXY UNKNOWN\r\nrest")[0] == ProxyHeader("", 0, "", 0, local=True)
    local = proxyproto.V2_SIG + b"\x20\x00\x00\x00"
    assert parse(local) == (ProxyHeader("", 0, "", 0, local=True), 16)
