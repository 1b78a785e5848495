"""Framing codecs: split a client byte stream into messages, and back.

Pure and I/O-free. A decoder is fed whatever one socket read returned and
returns the whole messages it completed; it keeps at most one partial message
(bounded by the maximum frame size). An encoder turns one upstream payload into
the bytes the client receives. (The spellings are parsed in pmlb.protocol.domain.)

* ``raw``   - every read is a frame (split at the maximum frame size); no
  encoding. Not a message framing: a message may span frames, and on failover
  the next upstream may get the second half of one (say so wherever it is
  offered).
* ``line``  - messages end with ``\\n``; the payload excludes it. A ``\\r``
  before the ``\\n`` is kept: pmlb does not reinterpret the client's bytes.
* ``len16`` - a big-endian unsigned 16-bit length, then that many bytes; the
  payload excludes the length (the node puts it back on what upstreams send).
* ``len32`` - the same with a 32-bit length.
* ``length-field:...`` - Netty's length-field rule (pmlb.protocol.domain.LengthField);
  the presets ``mqtt``, ``modbus-tcp`` and ``smpp`` are such rules. With strip
  0 the payload is the whole message, header included, and what an upstream
  sends is written unchanged: it must be one whole message.
* ``delimiter:...`` - messages end with a byte string, kept in the payload or
  not (then the node appends it to what upstreams send).
* ``stomp`` - STOMP frames (content-length honoured), heart-beats as messages.
* ``plugin:NAME`` - a decoder class from the ``pmlb.framings`` entry points:
  ``cls(max_frame)`` with ``feed(data) -> list[bytes]`` and ``pending``, and
  optionally a static ``encode(payload) -> bytes`` (else payloads are written
  unchanged). The same contract as every decoder here: it keeps at most one
  partial message, bounded by the maximum frame size, and raises
  FrameTooLarge or FramingError (which close only that client).

The maximum frame size bounds the payload delivered (what the upstream gets).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Protocol

from pmlb.errors import FrameTooLarge, FramingError
from pmlb.protocol.domain import (
    FRAMING_PLUGINS,
    FramingSpec,
    LengthField,
    check_framing,
    parse_framing,
)


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

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return b""

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

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return self._buf

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

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return self._buf

    @property
    def pending(self) -> int:
        return len(self._buf)


class LengthFieldDecoder:
    __slots__ = ("_buf", "_limit", "_spec")

    def __init__(self, limit: int, spec: LengthField) -> None:
        self._limit = limit
        self._spec = spec
        self._buf = b""

    def _length(self, buf: bytes, at: int, end: int) -> tuple[int, int] | None:
        """(field value, field size) at ``at``; None when incomplete."""
        size = self._spec.size
        if size:
            if end - at < size:
                return None
            return int.from_bytes(
                buf[at : at + size], "big" if self._spec.big_endian else "little"
            ), size
        value = 0
        for i in range(4):
            if at + i >= end:
                return None
            byte = buf[at + i]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value, i + 1
        raise FramingError("a varint length longer than 4 bytes")

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        spec, limit = self._spec, self._limit
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while True:
            found = self._length(buf, pos + spec.offset, end)
            if found is None:
                break
            length, size = found
            header = spec.offset + size
            frame = header + length + spec.adjust
            if frame < header or frame < spec.strip:
                raise FramingError(f"length field {length} gives a frame shorter than its header")
            if frame - spec.strip > limit:
                raise FrameTooLarge(frame - spec.strip, limit)
            if pos + frame > end:
                break
            out.append(buf[pos + spec.strip : pos + frame])
            pos += frame
        self._buf = buf[pos:] if pos < end else b""
        return out

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return self._buf

    @property
    def pending(self) -> int:
        return len(self._buf)


class DelimiterDecoder:
    """Messages end with ``delimiter`` (any bytes); ``keep``: it stays part of
    the message delivered (and an upstream's message is written unchanged),
    else it is removed (and appended to what an upstream sends)."""

    __slots__ = ("_buf", "_delim", "_keep", "_limit")

    def __init__(self, limit: int, delimiter: bytes, keep: bool) -> None:
        self._limit = limit
        self._delim = delimiter
        self._keep = keep
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        delim, limit = self._delim, self._limit
        step = len(delim)
        out: list[bytes] = []
        pos = 0
        while True:
            at = buf.find(delim, pos)
            if at < 0:
                break
            size = at - pos + (step if self._keep else 0)  # what is delivered
            if size > limit:
                raise FrameTooLarge(size, limit)
            out.append(buf[pos : at + step] if self._keep else buf[pos:at])
            pos = at + step
        tail = len(buf) - pos
        # A delimiter may be split over reads: keep up to its length - 1 beyond the limit.
        if tail > limit + step - 1:
            raise FrameTooLarge(tail, limit)
        self._buf = buf[pos:]
        return out

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return self._buf

    @property
    def pending(self) -> int:
        return len(self._buf)


class StompDecoder:
    """STOMP 1.0-1.2 frames: a command line, header lines, an empty line, a
    body, then a NUL; the body's length is ``content-length`` when that header
    comes first (the body may then hold NULs), else it runs to the first NUL.
    An EOL between frames (a heart-beat, or the optional EOLs after a NUL) is a
    message of its own, so the upstream sees the client's heart-beats. Frames
    are delivered byte for byte (an upstream's frames are written unchanged)."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = b""

    def _frame_end(self, buf: bytes, pos: int) -> int:
        """The end of the frame at ``pos`` (past its NUL), or -1 if incomplete."""
        limit = self._limit
        nl = buf.find(b"\n\n", pos)
        crlf = buf.find(b"\n\r\n", pos)
        ends = [e for e in ((nl, 2), (crlf, 3)) if e[0] >= 0]
        if not ends:
            if len(buf) - pos > limit:
                raise FrameTooLarge(len(buf) - pos, limit)
            return -1
        at, step = min(ends)
        body = at + step
        length = None
        for line in buf[pos:at].split(b"\n")[1:]:
            name, sep, value = line.rstrip(b"\r").partition(b":")
            if sep and name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise FramingError(f"content-length {value[:20]!r} is not a number") from None
                if length < 0:
                    raise FramingError("a negative content-length")
                break  # STOMP 1.2: the first occurrence of a header counts
        if length is not None:
            end = body + length
            if end + 1 - pos > limit:
                raise FrameTooLarge(end + 1 - pos, limit)
            if len(buf) <= end:
                return -1
            if buf[end] != 0:
                raise FramingError("no NUL after a content-length body")
            return end + 1
        nul = buf.find(b"\x00", body)
        if nul < 0:
            if len(buf) - pos > limit:
                raise FrameTooLarge(len(buf) - pos, limit)
            return -1
        if nul + 1 - pos > limit:
            raise FrameTooLarge(nul + 1 - pos, limit)
        return nul + 1

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            if buf[pos] == 0x0A:  # "\n": a heart-beat
                out.append(b"\n")
                pos += 1
                continue
            if buf[pos] == 0x0D:  # "\r\n": a heart-beat; a lone "\r" waits for its "\n"
                if pos + 1 >= end:
                    break
                if buf[pos + 1] != 0x0A:
                    raise FramingError("a carriage return that does not end a line")
                if self._limit < 2:
                    raise FrameTooLarge(2, self._limit)
                out.append(b"\r\n")
                pos += 2
                continue
            stop = self._frame_end(buf, pos)
            if stop < 0:
                break
            out.append(buf[pos:stop])
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        return out

    def buffered(self) -> bytes:
        """The incomplete message held back (a live handover carries it over)."""
        return self._buf

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


def _length_encoder(field: LengthField) -> Encoder:
    """Put the stripped length field back in front (strip == size, offset 0)."""
    order: Any = "big" if field.big_endian else "little"
    size, adjust, most = field.size, field.adjust, field.max_value

    def encode(payload: bytes) -> bytes:
        value = len(payload) - adjust
        if not 0 <= value <= most:
            raise FrameTooLarge(len(payload), most + adjust)
        return value.to_bytes(size, order) + payload

    return encode


def _delimiter_encoder(delimiter: bytes) -> Encoder:
    def encode(payload: bytes) -> bytes:
        return payload + delimiter

    return encode


@cache
def _plugin(name: str) -> Any:
    found = [ep for ep in entry_points(group=FRAMING_PLUGINS) if ep.name == name]
    if not found:
        raise FramingError(f"no framing plug-in {name!r} is installed")
    return found[0].load()


@cache
def _spec(framing: str) -> FramingSpec:
    return parse_framing(framing)


def make_decoder(framing: str, max_frame: int) -> Decoder:
    spec = check_framing(framing, max_frame)
    kind, field = spec.kind, spec.length
    if kind == "raw":
        return RawDecoder(max_frame)
    if kind == "line":
        return LineDecoder(max_frame)
    if kind == "length" and field is not None:
        if field.strip and field.size in (2, 4) and field.big_endian and not field.adjust:
            return LengthPrefixDecoder(max_frame, field.size)  # len16, len32: the fast path
        return LengthFieldDecoder(max_frame, field)
    if kind == "delimiter":
        return DelimiterDecoder(max_frame, spec.delimiter, spec.keep)
    if kind == "stomp":
        return StompDecoder(max_frame)
    decoder: Decoder = _plugin(spec.plugin)(max_frame)
    return decoder


def encoder_for(framing: str) -> Encoder:
    spec = _spec(framing)
    if spec.kind == "line":
        return _line_encode
    if spec.kind == "length" and spec.length is not None and spec.length.strip:
        if spec.spelling == "len16":
            return _len16_encode
        if spec.spelling == "len32":
            return _len32_encode
        return _length_encoder(spec.length)
    if spec.kind == "delimiter" and not spec.keep:
        return _delimiter_encoder(spec.delimiter)
    if spec.kind == "plugin":
        encode: Encoder | None = getattr(_plugin(spec.plugin), "encode", None)
        if encode is not None:
            return encode
    return _raw_encode  # whole messages, written unchanged
