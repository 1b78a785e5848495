"""The floor under pmlb's one-hop latency: a grpc.aio bidi-stream ping-pong.

grpc.aio completes every read and write on a poller thread and hands it to
the event loop through a socket, so one message each way on a stream costs a
fixed latency and CPU that no batching can remove when only one message is in
flight. pmlb's 1x1x64 row pays this twice (node and upstream each do a write
and a read per echo); this script measures it on its own, on loopback, with
64-byte messages, and prints one JSON line.

    python scripts/bench/grpc_floor.py [ROUND_TRIPS]
"""

from __future__ import annotations

import json
import socket
import sys
import time

import grpc
import uvloop

METHOD = "/bench.Floor/Echo"


async def main(rounds: int) -> None:
    async def echo(_it: object, ctx: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        while True:
            msg = await ctx.read()
            if not isinstance(msg, bytes):
                return
            await ctx.write(msg)

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Floor", {"Echo": handler}),)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(METHOD)()  # type: ignore[call-arg]
        payload = b"x" * 64
        for _ in range(200):  # warm-up
            await call.write(payload)
            await call.read()
        lat = []
        t_cpu = time.process_time()
        for _ in range(rounds):
            t = time.perf_counter()
            await call.write(payload)
            await call.read()
            lat.append(time.perf_counter() - t)
        cpu = time.process_time() - t_cpu
        await call.done_writing()
    await server.stop(0)
    lat.sort()
    print(
        json.dumps(
            {
                "round_trips": rounds,
                "p50_us": round(lat[len(lat) // 2] * 1e6),
                "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6),
                # Client and server share this process: CPU per round trip covers one
                # write + one read on each side, i.e. what one pmlb process pays per echo.
                "cpu_per_round_trip_us": round(cpu / rounds * 1e6 / 2, 1),
            }
        )
    )


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
