"""A framing plug-in: RESP, the Redis protocol, one command per message.

No length-field or delimiter setting describes RESP: a command is an array
(``*3\\r\\n$3\\r\\nSET\\r\\n...``) whose elements carry their own lengths, or an
inline command (``PING\\r\\n``). This decoder finds where each top-level value
ends, so every Data frame an upstream gets is one whole command, pipelined or
not, and a failover never splits one.

The contract every pmlb decoder keeps (see pmlb.dataplane.framing): ``feed``
returns the whole messages completed so far and keeps at most one partial
message, bounded by ``max_frame``; input it cannot accept raises
``FrameTooLarge`` or ``FramingError``, which close only that client. No
``encode``: replies are written unchanged.

Register it in a package's metadata and run the node with
``--framing plugin:resp``::

    [project.entry-points."pmlb.framings"]
    resp = "resp_framing:RespDecoder"
"""

from __future__ import annotations

from pmlb.errors import FrameTooLarge, FramingError

MAX_DEPTH = 16  # nested arrays (commands are flat; replies may nest a little)
MAX_ELEMENTS = 1 << 20


class RespDecoder:
    __slots__ = ("_buf", "_limit")

    def __init__(self, max_frame: int) -> None:
        self._limit = max_frame
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def _line(self, buf: bytes, at: int) -> tuple[bytes, int] | None:
        end = buf.find(b"\r\n", at)
        if end < 0:
            if len(buf) - at > self._limit:
                raise FrameTooLarge(len(buf) - at, self._limit)
            return None
        return buf[at:end], end + 2

    def _number(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise FramingError(f"not a RESP length: {text[:20]!r}") from None

    def _value(self, buf: bytes, at: int, depth: int) -> int | None:
        """The end of the value at ``at``, or None if incomplete."""
        if at >= len(buf):
            return None
        if depth > MAX_DEPTH:
            raise FramingError("RESP arrays nested too deep")
        kind = buf[at : at + 1]
        found = self._line(buf, at + 1 if kind in b"+-:$*" else at)
        if found is None:
            return None
        head, after = found
        if kind in (b"+", b"-", b":") or kind not in (b"$", b"*"):
            return after  # a simple value, or an inline command (one line)
        n = self._number(head)
        if kind == b"$":
            if n < 0:
                return after  # the null bulk string
            end = after + n + 2
            if end - at > self._limit:
                raise FrameTooLarge(end - at, self._limit)
            if len(buf) < end:
                return None
            if buf[end - 2 : end] != b"\r\n":
                raise FramingError("a bulk string without its CRLF")
            return end
        if n > MAX_ELEMENTS:
            raise FramingError(f"an array of {n} elements")
        for _ in range(max(0, n)):
            nxt = self._value(buf, after, depth + 1)
            if nxt is None:
                return None
            if nxt - at > self._limit:
                raise FrameTooLarge(nxt - at, self._limit)
            after = nxt
        return after

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            end = self._value(buf, pos, 0)
            if end is None:
                break
            if end - pos > self._limit:
                raise FrameTooLarge(end - pos, self._limit)
            out.append(buf[pos:end])
            pos = end
        self._buf = buf[pos:]
        if len(self._buf) > self._limit:
            raise FrameTooLarge(len(self._buf), self._limit)
        return out
