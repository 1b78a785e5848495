"""A tiny Redis-protocol (RESP) server behind pmlb, written with the Python SDK.

Run the node with ``--framing plugin:resp`` (node/examples/resp_framing.py,
registered under the ``pmlb.framings`` entry points): every Data frame is
then one whole command, pipelined or not. It answers PING, ECHO, CLIENT
(what client libraries send on connect) and, for anything else, an error.
Stateless, so any instance answers any command the same way.

    python node/examples/resp_server.py --listen 127.0.0.1:6390 --id r1
"""

from __future__ import annotations

import argparse
import asyncio

from pmlb.upstream import Conn, Handler, UpstreamServer


def parse(command: bytes) -> list[bytes]:
    """The words of one RESP command (an array of bulk strings, or inline);
    ValueError when it is neither."""
    if not command.startswith(b"*"):
        return command.rstrip(b"\r\n").split()
    end = command.index(b"\r\n")
    pos, words = end + 2, []
    for _ in range(int(command[1:end])):
        if command[pos : pos + 1] != b"$":
            raise ValueError("not a bulk string")
        end = command.index(b"\r\n", pos)
        size = int(command[pos + 1 : end])
        words.append(command[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return words


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def answer(words: list[bytes]) -> bytes:
    if not words:
        return b"-ERR empty command\r\n"
    name = words[0].upper()
    if name == b"PING":
        return bulk(words[1]) if len(words) > 1 else b"+PONG\r\n"
    if name == b"ECHO" and len(words) == 2:
        return bulk(words[1])
    if name == b"CLIENT":
        return b"+OK\r\n"
    return b"-ERR unknown command '%s'\r\n" % name[:32]


class RespHandler(Handler):
    def on_message(self, conn: Conn, data: bytes) -> None:
        try:
            words = parse(data)
        except ValueError:
            conn.send(b"-ERR protocol error\r\n")
            return
        conn.send(answer(words))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:6390", help="HOST:PORT for the Bridge")
    parser.add_argument("--id", default="resp", help="this upstream's id")
    args = parser.parse_args()
    server = UpstreamServer(RespHandler(), upstream_id=args.id, listen=args.listen)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(main())
