"""A small upstream written from the contract alone, with switchable faults.

It does not use the SDK: it implements the Bridge (proto/README.md) and the
conformance handler's commands on a bare grpc.aio server, one task per mark,
so that the conformance kit is checked against a second implementation, and
each ``Fault`` breaks one rule of the contract on purpose. The tests of the
kit (test_conformance.py) assert that the fault-free upstream passes every
case and that each fault fails exactly the cases that check its rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol import wire
from pmlb.upstream.conformance import flood_message


class Fault(enum.Enum):
    IGNORES_CREDIT = "ignores_credit"  # sends whatever it has, credit or not
    NEVER_ACKS = "never_acks"  # no acked on replies, no Flow.acked
    NEVER_GRANTS = "never_grants"  # never sends Flow.credit
    NO_DEDUPE = "no_dedupe"  # handles a seq it has already handled
    PINGS_BEHIND_HANDLERS = "pings_behind_handlers"  # answers Ping after busy handlers
    SMALL_MESSAGES = "small_messages"  # gRPC's default 4 MiB receive limit
    DIES_ON_GARBAGE = "dies_on_garbage"  # a message that is not a Batch ends the stream
    NO_HELLO_CHECK = "no_hello_check"  # serves a stream that never said Hello
    RAISE_ENDS_STREAM = "raise_ends_stream"  # a handler error ends the whole stream


# The cases each fault must fail, and no others.
EXPECTED_FAILURES: dict[Fault, set[str]] = {
    Fault.IGNORES_CREDIT: {"credit-respected"},
    Fault.NEVER_ACKS: {"data", "ack-no-reply", "credit-granted", "replay", "moved"},
    Fault.NEVER_GRANTS: {"credit-granted"},
    Fault.NO_DEDUPE: {"replay"},
    Fault.PINGS_BEHIND_HANDLERS: {"ping"},
    Fault.SMALL_MESSAGES: {"large-batch"},
    Fault.DIES_ON_GARBAGE: {"garbage"},
    Fault.NO_HELLO_CHECK: {"protocol-error"},
    Fault.RAISE_ENDS_STREAM: {"handler-error"},
}

WINDOW = 262_144


class _StreamBroken(Exception):
    pass


class _Mark:
    def __init__(self, session: _Session, mark: str, o: pb.Open) -> None:
        self.session = session
        self.mark = mark
        self.open = o
        self.metadata = dict(o.metadata)
        self.credit = session.peer_window
        self.seen = o.next_seq - 1  # highest seq received
        self.seq = o.next_seq - 1  # seq being handled
        self.owed = 0
        self.acked_sent = self.seq
        self.outbox: list[bytes] = []
        self.work: asyncio.Queue[tuple[str, Any, int]] = asyncio.Queue()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            kind, arg, cost = await self.work.get()
            try:
                if kind == "data":
                    await self.handle(arg)
                    self.owed += cost
                    self.settle()
                elif kind == "close":
                    if not self.closed:
                        self.session.close(self.mark, "upstream_closed", "close acknowledged")
                        self.forget()
                    return
            except _StreamBroken:
                raise
            except Exception:
                if Fault.RAISE_ENDS_STREAM in self.session.faults:
                    self.session.broken.set()
                    return
                self.session.close(self.mark, "upstream_error", "handler raised")
                self.forget()
                return
            finally:
                self.work.task_done()

    def forget(self) -> None:
        self.closed = True
        if self.session.marks.get(self.mark) is self:
            del self.session.marks[self.mark]

    async def handle(self, msg: tuple[int, bytes]) -> None:
        seq, data = msg
        self.seq = seq
        if not data.startswith(b"!"):
            self.send(data)
            return
        words = data.decode().split(" ")
        cmd, args = words[0], words[1:]
        if cmd == "!noreply":
            return
        if cmd == "!info":
            o = self.open
            self.send(
                json.dumps(
                    {
                        "mark": self.mark,
                        "service": o.service,
                        "client_addr": o.client_addr,
                        "client_port": o.client_port,
                        "node_id": o.node_id,
                        "framing": o.framing,
                        "resumed": o.resumed,
                        "metadata": self.metadata,
                        "trace_context": dict(o.trace_context),
                        "accepted_at_unix_ms": o.accepted_at_unix_ms,
                        "seq": seq,
                    }
                ).encode()
            )
        elif cmd == "!meta":
            key, _, value = " ".join(args).partition("=")
            self.metadata[key] = value
            f = self.session.frame(self.mark)
            f.meta.set[key] = value
        elif cmd == "!unmeta":
            f = self.session.frame(self.mark)
            f.meta.unset.extend(args)
        elif cmd == "!close":
            self.flush(force=True)
            self.session.close(self.mark, args[0], " ".join(args[1:]))
            self.forget()
        elif cmd == "!push":
            target = self.session.marks.get(args[0])
            text = " ".join(args[1:]).encode()
            if target is not None:
                target.send(text)
            else:
                f = self.session.frame(args[0])
                f.data.payload = text
        elif cmd == "!flood":
            for i in range(int(args[0])):
                self.send(flood_message(i, int(args[1])))
        elif cmd == "!sleep":
            await asyncio.sleep(int(args[0]) / 1000)
            self.send(b"slept")
        elif cmd == "!raise":
            raise RuntimeError("!raise")

    def send(self, payload: bytes) -> None:
        if self.outbox or (self.credit <= 0 and Fault.IGNORES_CREDIT not in self.session.faults):
            self.outbox.append(payload)
            return
        self.emit(payload)

    def emit(self, payload: bytes) -> None:
        self.credit -= len(payload) + self.session.overhead
        f = self.session.frame(self.mark)
        f.data.payload = payload
        if Fault.NEVER_ACKS not in self.session.faults:
            f.data.acked = self.seq
            self.acked_sent = self.seq

    def flush(self, force: bool = False) -> None:
        while self.outbox and (force or self.credit > 0):
            self.emit(self.outbox.pop(0))

    def settle(self) -> None:
        faults = self.session.faults
        ack = Fault.NEVER_ACKS not in faults and self.acked_sent < self.seq and not self.outbox
        grant = Fault.NEVER_GRANTS not in faults and self.owed >= WINDOW // 2
        if ack or grant:
            f = self.session.frame(self.mark)
            if ack:
                f.flow.acked = self.acked_sent = self.seq
            if grant:
                f.flow.credit, self.owed = self.owed, 0


class _Session:
    def __init__(self, faults: set[Fault], hello: pb.Hello) -> None:
        self.faults = faults
        self.peer_window = hello.initial_window or WINDOW
        self.overhead = wire.frame_overhead(min(hello.protocol or 1, 2))
        self.marks: dict[str, _Mark] = {}
        self.out: asyncio.Queue[pb.Batch] = asyncio.Queue()
        self.broken = asyncio.Event()

    def frame(self, mark: str) -> pb.Frame:
        batch = pb.Batch()
        f = batch.frames.add()
        f.mark = mark
        self.out.put_nowait(batch)
        return f

    def close(self, mark: str, reason: str, detail: str) -> None:
        f = self.frame(mark)
        f.close.reason = reason
        f.close.detail = detail

    async def apply(self, batch: pb.Batch) -> None:
        for f in batch.frames:
            kind = f.WhichOneof("kind")
            m = self.marks.get(f.mark)
            if kind == "open":
                if m is not None:
                    m.task.cancel()
                self.marks[f.mark] = _Mark(self, f.mark, f.open)
            elif kind == "data" and m is not None:
                seq = f.data.seq
                if seq <= m.seen and Fault.NO_DEDUPE not in self.faults:
                    m.owed += len(f.data.payload) + self.overhead
                    continue
                m.seen = max(m.seen, seq)
                cost = len(f.data.payload) + self.overhead
                m.work.put_nowait(("data", (seq, f.data.payload), cost))
            elif kind == "flow" and m is not None:
                m.credit += f.flow.credit
                m.flush()
            elif kind == "close" and m is not None:
                m.work.put_nowait(("close", f.close.reason, 0))
            elif kind == "ping" and not f.ping.reply:
                if Fault.PINGS_BEHIND_HANDLERS in self.faults:
                    await asyncio.gather(*(m.work.join() for m in list(self.marks.values())))
                r = self.frame("")
                r.ping.id = f.ping.id
                r.ping.reply = True


class BridgeUpstream:
    """The upstream: ``await start()``, then ``port``; ``await stop()``."""

    def __init__(self, faults: set[Fault] | None = None) -> None:
        self.faults = faults or set()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def _bridge(
        self, requests: AsyncIterator[pb.Batch | None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Batch]:
        it = requests.__aiter__()
        first = await it.__anext__()
        if first is None or (
            not first.HasField("hello") and Fault.NO_HELLO_CHECK not in self.faults
        ):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first Batch must carry hello")
        session = _Session(self.faults, first.hello)
        yield pb.Batch(hello=pb.Hello(id="bridge-upstream", protocol=2, initial_window=WINDOW))
        await session.apply(first)

        async def read() -> None:
            async for batch in it:
                if batch is None:
                    if Fault.DIES_ON_GARBAGE in self.faults:
                        session.broken.set()
                        return
                    continue
                await session.apply(batch)
            session.broken.set()

        loop = asyncio.get_running_loop()
        reader = loop.create_task(read())
        broken = loop.create_task(session.broken.wait())
        get: asyncio.Task[pb.Batch] | None = None
        try:
            while True:
                get = loop.create_task(session.out.get())
                done, _ = await asyncio.wait({get, broken}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    await context.abort(grpc.StatusCode.INTERNAL, "stream broken on purpose")
                yield get.result()
        finally:
            tasks = [reader, broken, *(m.task for m in session.marks.values())]
            if get is not None:
                tasks.append(get)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def start(self) -> int:
        small = Fault.SMALL_MESSAGES in self.faults
        options = [] if small else [("grpc.max_receive_message_length", wire.GRPC_MAX_MESSAGE)]
        server = grpc.aio.server(options=options)
        handler = grpc.stream_stream_rpc_method_handler(
            self._bridge,
            request_deserializer=wire.parse_batch_lenient,
            response_serializer=wire.serialize_batch,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("pmlb.v1.Upstream", {"Bridge": handler}),)
        )
        servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        for service in ("", "pmlb.v1.Upstream"):
            await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop(0.5)
