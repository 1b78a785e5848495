"""Framing codecs: split a client byte stream into messages, and back.

Pure and I/O-free. A decoder is fed whatever one socket read returned and
returns the whole messages it completed; it keeps at most one partial message
(bounded by the maximum frame size). An encoder turns one upstream payload into
the bytes the client receives.

* ``raw``   - every read is a frame (split at the maximum frame size); no encoding.
* ``line``  - messages end with ``\\n``; the payload excludes it. A ``\\r``
  before the ``\\n`` is kept: pmlb does not reinterpret the client's bytes.
* ``len16`` - a big-endian unsigned 16-bit length, then that many bytes.
* ``len32`` - the same with a 32-bit length.

The maximum frame size bounds the payload (without delimiter or prefix).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, Protocol

from pmlb.domain import MESSAGE_FRAMINGS, check_framing
from pmlb.errors import FrameTooLarge


class Decoder(Protocol):
    def feed(self, data: bytes) -> list[bytes]:
        """Return the messages completed by ``data``; raise FrameTooLarge."""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""


class RawDecoder:
    __slots__ = ("_limit",)

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        limit = self._limit
        if len(data) <= limit:
            return [data] if data else []
        return [data[i : i + limit] for i in range(0, len(data), limit)]

    @property
    def pending(self) -> int:
        return 0


class LineDecoder:
    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:
            data = self._buf + data
        parts = data.split(b"\n")
        tail = parts.pop()
        limit = self._limit
        if len(tail) > limit:
            raise FrameTooLarge(len(tail), limit)
        if parts and max(map(len, parts)) > limit:
            raise FrameTooLarge(max(map(len, parts)), limit)
        self._buf = tail
        return parts

    @property
    def pending(self) -> int:
        return len(self._buf)


class LengthPrefixDecoder:
    __slots__ = ("_buf", "_hdr", "_limit", "_unpack")

    def __init__(self, limit: int, header: int) -> None:
        self._limit = limit
        self._hdr = header
        self._unpack = struct.Struct(">H" if header == 2 else ">I").unpack_from
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        hdr, limit, unpack = self._hdr, self._limit, self._unpack
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= hdr:
            (size,) = unpack(buf, pos)
            if size > limit:
                raise FrameTooLarge(size, limit)
            stop = pos + hdr + size
            if stop > end:
                break
            out.append(buf[pos + hdr : stop])
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


Encoder = Callable[[bytes], bytes]


def _raw_encode(payload: bytes) -> bytes:
    return payload


def _line_encode(payload: bytes) -> bytes:
    return payload + b"\n"


_LEN16 = struct.Struct(">H").pack
_LEN32 = struct.Struct(">I").pack


def _len16_encode(payload: bytes) -> bytes:
    if len(payload) > 0xFFFF:
        raise FrameTooLarge(len(payload), 0xFFFF)
    return _LEN16(len(payload)) + payload


def _len32_encode(payload: bytes) -> bytes:
    return _LEN32(len(payload)) + payload


_ENCODERS: Final[dict[str, Encoder]] = {
    "raw": _raw_encode,
    "line": _line_encode,
    "len16": _len16_encode,
    "len32": _len32_encode,
}


def make_decoder(framing: str, max_frame: int) -> Decoder:
    check_framing(framing, max_frame)
    if framing == "raw":
        return RawDecoder(max_frame)
    if framing == "line":
        return LineDecoder(max_frame)
    return LengthPrefixDecoder(max_frame, 2 if framing == "len16" else 4)


def encoder_for(framing: str) -> Encoder:
    return _ENCODERS[framing]


def is_message_framing(framing: str) -> bool:
    return framing in MESSAGE_FRAMINGS
