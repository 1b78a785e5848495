"""PROXY protocol v1 and v2 (HAProxy's spec): pure, I/O-free parsing.

A load balancer in front of pmlb (an AWS NLB, HAProxy, another proxy) can
prepend a PROXY header carrying the real client address. pmlb reads it only
from peers in ``--proxy-trusted`` networks; from anyone else the same bytes are
ordinary client data, so nobody can spoof an address by sending a header.

``parse(buf)`` returns ``(header, consumed)``: ``(None, 0)`` while more bytes
are needed, raises BadProxyHeader when ``buf`` cannot be a valid header. A v1
header is at most 107 bytes; a v2 header is bounded by MAX_V2 here.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, NamedTuple

from pmlb.errors import PmlbError

V2_SIG: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX: Final = 107
MAX_V2: Final = 16 + 4096  # address block + TLVs we are willing to buffer


class BadProxyHeader(PmlbError):
    """The bytes from a trusted peer are not a valid PROXY header."""


class ProxyHeader(NamedTuple):
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    # True for v1 UNKNOWN / v2 LOCAL (health checks from the proxy itself):
    # keep the connection's own addresses.
    local: bool = False


def parse(buf: bytes) -> tuple[ProxyHeader | None, int]:
    if not buf:
        return None, 0
    if buf[: len(V2_SIG)] == V2_SIG[: len(buf)] and buf[0] == 0x0D:
        return _parse_v2(buf)
    if b"PROXY "[: len(buf)] == buf[:6]:
        return _parse_v1(buf)
    raise BadProxyHeader("no PROXY protocol signature")


def _parse_v1(buf: bytes) -> tuple[ProxyHeader | None, int]:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise BadProxyHeader("PROXY v1 line longer than 107 bytes")
        return None, 0
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise BadProxyHeader("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader("", 0, "", 0, local=True), end + 2
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise BadProxyHeader(f"bad PROXY v1 line ({len(parts)} fields)")
    _, proto, src, dst, sport, dport = parts
    version = 4 if proto == "TCP4" else 6
    return ProxyHeader(_ip(src, version), _port(sport), _ip(dst, version), _port(dport)), end + 2


def _ip(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise BadProxyHeader(f"bad address {text[:48]!r}") from None
    if addr.version != version:
        raise BadProxyHeader(f"address {text!r} is not IPv{version}")
    return str(addr)


def _port(text: str) -> int:
    if (
        not text.isdigit()
        or len(text) > 5
        or int(text) > 65535
        or (len(text) > 1 and text[0] == "0")
    ):
        raise BadProxyHeader(f"bad port {text[:8]!r}")
    return int(text)


def _parse_v2(buf: bytes) -> tuple[ProxyHeader | None, int]:
    if len(buf) < 16:
        return None, 0
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from(">H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        raise BadProxyHeader(f"PROXY v2 version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise BadProxyHeader(f"PROXY v2 command {cmd}")
    if 16 + length > MAX_V2:
        raise BadProxyHeader(f"PROXY v2 header of {length} bytes is too long")
    if len(buf) < 16 + length:
        return None, 0
    body = buf[16 : 16 + length]
    total = 16 + length
    if cmd == 0:  # LOCAL: the proxy's own connection, e.g. a health check
        return ProxyHeader("", 0, "", 0, local=True), total
    family, transport = fam >> 4, fam & 0x0F
    if transport not in (0, 1):  # only STREAM (or unspecified) makes sense for TCP
        raise BadProxyHeader(f"PROXY v2 transport {transport}")
    if family == 1:  # AF_INET
        if length < 12:
            raise BadProxyHeader("PROXY v2 IPv4 block too short")
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from(">HH", body, 8)
    elif family == 2:  # AF_INET6
        if length < 36:
            raise BadProxyHeader("PROXY v2 IPv6 block too short")
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack_from(">HH", body, 32)
    elif family == 0:  # UNSPEC: keep the connection's addresses
        return ProxyHeader("", 0, "", 0, local=True), total
    else:
        raise BadProxyHeader(f"PROXY v2 address family {family} is not supported")
    return ProxyHeader(src, sport, dst, dport), total


def v1(src: str, sport: int, dst: str, dport: int) -> bytes:
    """Build a v1 header (tests and tools)."""
    proto = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str, dport: int) -> bytes:
    """Build a v2 PROXY header (tests and tools)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack(">HH", sport, dport)
    return V2_SIG + bytes([0x21, fam]) + struct.pack(">H", len(body)) + body
