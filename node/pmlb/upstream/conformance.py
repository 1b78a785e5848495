"""The conformance handler: what an upstream runs while ``pmlb conformance``
checks it (``pmlb echo-upstream --conformance``).

The kit (``pmlb.testing.conformance_kit``) plays a node and needs the upstream's
application to do known things on request, so it drives this handler with a
small command vocabulary; every other payload is echoed unchanged. The same
vocabulary is implemented by the Node.js SDK's example, and an SDK in any
other language ships it the same way (proto/README.md, "The conformance kit").

Commands are text payloads starting with ``!``:

==========================  ==================================================
``!noreply ...``            do nothing (the message is acknowledged, no reply)
``!info``                   reply with a JSON object of what the handler sees
``!meta KEY=VALUE``         set metadata on the mark
``!unmeta KEY``             remove a metadata key
``!close REASON [DETAIL]``  close the mark with that reason
``!push MARK TEXT``         send TEXT to another mark of the same node
``!flood N SIZE``           send N messages of SIZE bytes (6-digit index, ``.``)
``!sleep MS``               wait MS milliseconds (async), then reply ``slept``
``!raise``                  the handler raises
==========================  ==================================================
"""

from __future__ import annotations

import asyncio
import json

from pmlb.upstream.sdk import Conn, Handler, UpstreamServer


class HandlerFault(Exception):
    """Raised on purpose by ``!raise``: a handler bug must cost only its mark."""


def flood_message(index: int, size: int) -> bytes:
    """Message ``index`` of a ``!flood``: its index in 6 digits, padded with '.'."""
    head = b"%06d" % index
    return head[:size] + b"." * max(0, size - len(head))


def info(conn: Conn) -> bytes:
    """The ``!info`` reply: the mark as the handler sees it."""
    return json.dumps(
        {
            "mark": conn.mark,
            "service": conn.service,
            "client_addr": conn.client_addr,
            "client_port": conn.client_port,
            "node_id": conn.node_id,
            "framing": conn.framing,
            "resumed": conn.resumed,
            "metadata": conn.metadata,
            "trace_context": conn.trace_context,
            "accepted_at_unix_ms": conn.accepted_at_unix_ms,
            "seq": conn.seq,
        },
        sort_keys=True,
    ).encode()


class ConformanceHandler(Handler):
    """Echo, plus the kit's commands (see the module docstring)."""

    def __init__(self, server: UpstreamServer | None = None) -> None:
        # push() needs the server; it is set after construction when the
        # server is built with this handler.
        self.server = server

    def on_message(self, conn: Conn, data: bytes) -> asyncio.Future[None] | None:
        if not data.startswith(b"!"):
            conn.send(data)
            return None
        words = data.decode("utf-8", "replace").split(" ")
        command, args = words[0], words[1:]
        if command == "!noreply":
            return None
        if command == "!info":
            conn.send(info(conn))
        elif command == "!meta":
            key, _, value = " ".join(args).partition("=")
            conn.set_meta({key: value})
        elif command == "!unmeta":
            conn.unset_meta(*args)
        elif command == "!close":
            conn.close(args[0] if args else "", " ".join(args[1:]))
        elif command == "!push":
            assert self.server is not None, "ConformanceHandler needs its server for !push"
            return asyncio.ensure_future(self.server.push(args[0], " ".join(args[1:]).encode()))
        elif command == "!flood":
            count, size = int(args[0]), int(args[1])
            for i in range(count):
                conn.send(flood_message(i, size))
        elif command == "!sleep":
            return asyncio.ensure_future(self._sleep(conn, int(args[0])))
        elif command == "!raise":
            raise HandlerFault("!raise asked for it")
        else:
            conn.send(b"unknown command " + command.encode())
        return None

    @staticmethod
    async def _sleep(conn: Conn, ms: int) -> None:
        await asyncio.sleep(ms / 1000)
        conn.send(b"slept")
