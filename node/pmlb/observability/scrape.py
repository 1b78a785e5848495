"""Bounded HTTP GETs to nodes' admin endpoints: ``pmlb status`` and the
cluster page (``pmlb dashboard``) ask every registered node this way.

The addresses come from etcd, and whoever can write there chooses them, so
each request here:

* is bounded in **total** time and size (a node that sends one byte a second,
  or a body without end, costs its own row and ``total`` seconds at most; a
  per-read timeout would let a trickle hold the page for ever);
* follows **no redirect** (a 3xx is an answer, reported as such: a redirect
  would carry the caller's token to a host nobody registered);
* runs on the event loop, not in a shared thread pool that one slow node
  could fill for everyone else.

Values read from the answers are checked the same way: ``finite_count`` turns
NaN, infinities and negative numbers into None instead of an exception.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

from pmlb.errors import ConfigError, PmlbError
from pmlb.protocol.domain import parse_hostport

SCRAPE_TIMEOUT: Final = 3.0
MAX_SCRAPE_BYTES: Final = 4 << 20  # a node's /metrics is tens of KiB; 4 MiB is generous
MAX_HEAD_BYTES: Final = 16 << 10


class ScrapeError(PmlbError):
    """A node's admin endpoint could not be read, or answered out of bounds."""


async def get(
    addr: str,
    target: str,
    headers: dict[str, str] | None = None,
    timeout: float = SCRAPE_TIMEOUT,
    max_bytes: int = MAX_SCRAPE_BYTES,
) -> tuple[int, bytes]:
    """``GET target`` from ``addr`` (HOST:PORT): (status, body), no redirect
    followed. ScrapeError when it cannot be read within ``timeout`` seconds in
    all, or the answer is malformed or over ``max_bytes``."""
    try:
        host, port = parse_hostport(addr, "admin address")
    except ConfigError as exc:
        raise ScrapeError(str(exc)) from None
    try:
        async with asyncio.timeout(timeout):
            return await _get(host, port, addr, target, headers or {}, max_bytes)
    except TimeoutError:
        raise ScrapeError(f"{addr}: no whole answer within {timeout:g} s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise ScrapeError(f"{addr}: {exc.__class__.__name__}: {exc}") from None


async def _get(
    host: str, port: int, addr: str, target: str, headers: dict[str, str], max_bytes: int
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: {addr}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ScrapeError(f"{addr}: not an HTTP answer")
        status = int(parts[1])
        length: int | None = None
        for field in fields:
            name, _, value = field.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding":
                raise ScrapeError(f"{addr}: Transfer-Encoding is not used by pmlb nodes")
            if name == "content-length":
                if not value.strip().isdigit():
                    raise ScrapeError(f"{addr}: bad Content-Length")
                length = int(value)
        if length is not None and length > max_bytes:
            raise ScrapeError(f"{addr}: answer of {length} bytes, over {max_bytes}")
        want = max_bytes + 1 if length is None else length
        body = b""
        while len(body) < want:
            chunk = await reader.read(min(want - len(body), 1 << 16))
            if not chunk:
                break
            body += chunk
        if len(body) > max_bytes:
            raise ScrapeError(f"{addr}: answer over {max_bytes} bytes")
        if length is not None and len(body) < length:
            raise ScrapeError(f"{addr}: answer cut short ({len(body)} of {length} bytes)")
        return status, body
    finally:
        writer.close()


def finite_count(value: object) -> int | None:
    """A counter or gauge read from a node as an int; None unless it is a
    finite number of at least 0 (NaN, +Inf and negatives mean nothing here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)
