"""``pmlb connect HOST:PORT``: the line client a newcomer needs (no ``nc``).

Each line typed (or piped) on standard input is sent as one message in the
service's framing; each message that comes back is printed on its own line.
With the example echo upstream a reply reads ``<mark> <upstream id> <message>``:
the connection's mark, and which upstream answered. At the end of input the
client half-closes, prints what is still owed and exits when the node closes
(or after ``--linger``). Exit 0 when the node closed normally, 1 when the
connection failed.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import sys
from typing import Final

from pmlb.domain import parse_hostport
from pmlb.errors import ConfigError

FRAMINGS: Final = ("line", "len16", "len32", "raw")


def encode(framing: str, msg: bytes) -> bytes:
    if framing == "line":
        return msg + b"\n"
    if framing == "len16":
        return struct.pack(">H", len(msg)) + msg
    if framing == "len32":
        return struct.pack(">I", len(msg)) + msg
    return msg


async def read_message(reader: asyncio.StreamReader, framing: str) -> bytes:
    """One message; b"" at the end of the stream (IncompleteReadError for a cut one)."""
    if framing == "line":
        line = await reader.readline()
        return line[:-1] if line.endswith(b"\n") else line
    if framing == "raw":
        return await reader.read(65536)
    size = 2 if framing == "len16" else 4
    header = await reader.readexactly(size)
    (n,) = struct.unpack(">H" if size == 2 else ">I", header)
    return await reader.readexactly(n) if n else b""


async def _stdin_lines() -> asyncio.StreamReader | None:
    """Standard input as a StreamReader (a terminal or a pipe); None for a
    file or /dev/null, read with plain blocking reads (they never wait)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return None
    # Terminals, pipes and sockets only: other character devices (/dev/null)
    # and files do not block, and an event loop may refuse (or abort on) them.
    if not (sys.stdin.isatty() or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        return None
    return reader


async def connect(target: str, framing: str, linger: float, stop: asyncio.Event) -> int:
    if framing not in FRAMINGS:
        raise ConfigError(f"--framing must be one of {', '.join(FRAMINGS)}")
    host, port = parse_hostport(target, "HOST:PORT")
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        print(f"pmlb connect: cannot connect to {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"connected to {target} ({framing} framing); type a line, Ctrl-D to end", file=sys.stderr)

    async def show() -> None:
        while True:
            try:
                msg = await read_message(reader, framing)
            except asyncio.IncompleteReadError:
                return
            if not msg and reader.at_eof():
                return
            sys.stdout.write(msg.decode(errors="replace") + "\n")
            sys.stdout.flush()

    shown = asyncio.ensure_future(show())
    stdin = await _stdin_lines()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            if stdin is None:
                line = sys.stdin.buffer.readline()
            else:
                read = asyncio.ensure_future(stdin.readline())
                await asyncio.wait({read, stopped, shown}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():  # Ctrl-C, or the node closed the connection
                    read.cancel()
                    break
                line = read.result()
            if not line:
                break
            writer.write(encode(framing, line.rstrip(b"\r\n")))
            await writer.drain()
            if shown.done():
                break
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(shown, linger)
    except TimeoutError:
        print(f"pmlb connect: no close from the node within {linger:g}s", file=sys.stderr)
    except (ConnectionError, OSError) as exc:
        print(f"pmlb connect: connection failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shown.cancel()
        stopped.cancel()
        writer.close()
    return 0
