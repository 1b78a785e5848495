"""Chat rooms across upstreams, with the Python SDK: the twin of the Node.js
SDK's node/upstream-js/examples/rooms.js (the same lines in, the same lines
out), to show the SDK calls a real server needs. Run the node with
``--framing line`` and ``--push-upstreams`` naming these upstreams.

* ``join ROOM``: answers ``joined ROOM`` (the room is kept in the mark's
  metadata, so it survives a failover);
* ``say TEXT``: every other member of the room, on any upstream, gets
  ``<mark> says TEXT``; the sender then gets ``said N``, N the members the
  node accepted it for;
* ``who``: answers ``members M1 M2 ...`` (the room's marks, sorted);
* ``push MARK TEXT``: MARK gets TEXT; the sender gets ``accepted``, ``gone``
  or ``refused REASON``;
* ``kick MARK``: MARK's client is closed (reason ``kicked``); the sender gets
  ``kicked``.

    python node/examples/rooms_server.py --listen 127.0.0.1:4773 --id py1
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from pmlb.errors import MarkGone, PushRefused
from pmlb.upstream import Conn, Handler, UpstreamServer


class Rooms(Handler):
    def __init__(self) -> None:
        self.server: UpstreamServer | None = None

    def members(self, room: str) -> list[str]:
        assert self.server is not None
        return sorted(
            m for m, info in self.server.marks.items() if info.metadata.get("room") == room
        )

    async def on_message(self, conn: Conn, data: bytes) -> None:
        assert self.server is not None
        cmd, _, arg = data.decode().partition(" ")
        if cmd == "join":
            conn.set_meta({"room": arg})
            await conn.accepted()  # every upstream has been told before the answer
            conn.send(f"joined {arg}".encode())
        elif cmd == "say":
            line = f"{conn.mark} says {arg}".encode()
            others = [m for m in self.members(conn.metadata.get("room", "")) if m != conn.mark]
            results = await asyncio.gather(
                *(self.server.push(m, line) for m in others), return_exceptions=True
            )
            conn.send(b"said %d" % sum(1 for r in results if r is None))
        elif cmd == "who":
            conn.send(("members " + " ".join(self.members(conn.metadata.get("room", "")))).encode())
        elif cmd == "push":
            mark, _, text = arg.partition(" ")
            try:
                await self.server.push(mark, text.encode())
                conn.send(b"accepted")
            except MarkGone:
                conn.send(b"gone")
            except PushRefused as exc:
                conn.send(f"refused {exc.reason}".encode())
        elif cmd == "kick":
            await self.server.close_mark(arg, "kicked")
            conn.send(b"kicked")
        else:
            conn.send(f"unknown command {cmd}".encode())


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:4773", help="HOST:PORT to serve the Bridge on")
    p.add_argument("--id", default="py1", help="this upstream's id")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rooms = Rooms()
    server = UpstreamServer(rooms, upstream_id=args.id, listen=args.listen, watch_marks=True)
    rooms.server = server
    await server.start()
    await server.wait()


if __name__ == "__main__":
    asyncio.run(main())
