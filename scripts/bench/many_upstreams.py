"""Many SDK echo upstreams in one process, for `make bench-cluster`.

    python scripts/bench/many_upstreams.py FIRST_PORT COUNT

Serves COUNT `pmlb.v1.Upstream` servers on 127.0.0.1:FIRST_PORT.. (one per
port: each is a separate upstream to the nodes), prints READY, and serves
until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from pmlb import aio
from pmlb.upstream.echo import EchoHandler
from pmlb.upstream.sdk import UpstreamServer


async def serve(first: int, count: int, stop: asyncio.Event) -> int:
    servers = [
        UpstreamServer(
            EchoHandler(f"u{i}", plain=True), upstream_id=f"u{i}", listen=f"127.0.0.1:{first + i}"
        )
        for i in range(count)
    ]
    for s in servers:
        await s.start()
    print("READY", flush=True)
    await stop.wait()
    await asyncio.gather(*(s.stop(0.5) for s in servers))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    first_port, n = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(aio.run(lambda stop: serve(first_port, n, stop)))
