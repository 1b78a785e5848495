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
import sys
from typing import Final

from pmlb.dataplane.framing import encoder_for, make_decoder
from pmlb.errors import ConfigError, FrameTooLarge
from pmlb.protocol.domain import parse_hostport

FRAMINGS: Final = ("line", "len16", "len32", "raw")
MAX_MESSAGE: Final = 16 << 20


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

    encode = encoder_for(framing)
    # The node's own codecs; len16 carries at most 65535 bytes by construction.
    decoder = make_decoder(framing, 0xFFFF if framing == "len16" else MAX_MESSAGE)

    async def show() -> None:
        while data := await reader.read(65536):
            for msg in decoder.feed(data):
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
            writer.write(encode(line.rstrip(b"\r\n")))
            await writer.drain()
            if shown.done():
                break
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(shown, linger)
    except TimeoutError:
        print(f"pmlb connect: no close from the node within {linger:g}s", file=sys.stderr)
    except (ConnectionError, OSError, FrameTooLarge) as exc:
        print(f"pmlb connect: connection failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shown.cancel()
        stopped.cancel()
        writer.close()
    return 0
