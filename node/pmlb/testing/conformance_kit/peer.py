"""The kit's end of one Bridge stream: a node's bookkeeping (Hello, credit
both ways, acknowledgements, frames filed by mark) and the checks that hold on
every stream whatever the case."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from pmlb import __version__
from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.aio import wait_event
from pmlb.errors import PmlbError
from pmlb.protocol import wire
from pmlb.transport import (
    DEFAULT_TRANSPORT,
    ClientStream,
    ClientTLS,
    TransportError,
)

# How long an answer may take. 5 s is the node's default --ack-timeout: an
# upstream slower than that has its link broken by a real node.
ANSWER_TIMEOUT: Final = 5.0
# How long the kit watches for something that must NOT happen (a frame over
# credit, a duplicate reply) after a barrier has shown the upstream got there.
QUIET: Final = 0.2
# Bound on the frames one stream may hold unread by a case.
MAX_HELD_FRAMES: Final = 200_000
DOC: Final = "proto/README.md"
KIT_SOFTWARE: Final = f"pmlb-conformance/{__version__}"


class CaseFailed(PmlbError):
    """A case found the upstream breaking the contract; the message says how."""


@dataclass
class Options:
    target: str
    transport: str = DEFAULT_TRANSPORT
    tls: ClientTLS | None = None
    token: str | None = None
    # The node id the kit's streams say they come from, and the prefix of
    # its marks (push needs marks of one node).
    node_id: str = field(default_factory=lambda: f"conformance-{secrets.token_hex(3)}")
    # How long an answer may take (the node's --ack-timeout).
    timeout: float = ANSWER_TIMEOUT


class _Raw:
    """Bytes that the transport writes as they are (a message that is not a
    valid Batch, or one with fields this version does not know)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # the protobuf method's name
        return self.data


class Peer:
    """One Bridge stream from the kit to the upstream, with the node's bookkeeping.

    A reader task files every frame by mark; cases wait on conditions with
    ``until`` (an event set on every received Batch, a deadline, no polling
    sleeps). Credit is tracked both ways: ``send`` spends the upstream's
    grants and waits for more; data from the upstream is checked against what
    the kit granted and, with ``auto_grant``, granted straight back (a client
    reading as fast as it can).
    """

    def __init__(
        self,
        stream: ClientStream,
        *,
        node_id: str,
        window: int,
        protocol: int,
        auto_grant: bool,
        timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.stream = stream
        self.timeout = timeout
        self.node_id = node_id
        self.window = window  # what this side grants per mark (our Hello)
        self.protocol = protocol
        self.auto_grant = auto_grant
        self.writer = wire.BatchWriter(stream.write)
        self.hello: pb.Hello | None = None
        self.batches = 0
        self.ended: str | None = None  # why the stream ended, once it has
        self.violations: list[str] = []
        self.frames: dict[str, deque[pb.Frame]] = {}
        self.held = 0
        self.pongs: dict[int, float] = {}
        self.unexpected_pings = 0
        # Credit: what we may still send per mark; what we granted / what the
        # upstream spent per mark; our last seq and its highest ack per mark.
        self.overhead = wire.frame_overhead(protocol)
        self.peer_window = 0
        self.send_credit: dict[str, int] = {}
        self.kit_spent: dict[str, int] = {}
        self.credit_in: dict[str, int] = {}
        self.granted: dict[str, int] = {}
        self.spent: dict[str, int] = {}
        self.seq: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self, hello: bool = True) -> None:
        if hello:
            h = self.writer.current.hello
            h.id = self.node_id
            h.protocol = self.protocol
            h.initial_window = self.window
            h.service = "conformance"
            h.software = KIT_SOFTWARE
        self._writer_task = self.writer.start()
        self._writer_task.add_done_callback(self._writer_done)
        self.writer.kick()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.ended = self.ended or f"writing failed: {task.exception()}"
            self._changed.set()

    async def close(self) -> None:
        for task in (self._reader, self._writer_task):
            if task is not None:
                task.cancel()
        self.stream.cancel()
        for task in (self._reader, self._writer_task):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self.stream.close()

    async def _read(self) -> None:
        try:
            while True:
                batch = await self.stream.read()
                if batch is None:
                    self.violations.append("sent a gRPC message that is not a pmlb.v1.Batch")
                else:
                    self._on_batch(batch)
                self._changed.set()
        except wire.StreamEnded:
            self.ended = "the upstream ended the stream (status OK)"
        except TransportError as exc:
            self.ended = f"the stream failed: {exc}"
        self._changed.set()

    def _on_batch(self, batch: pb.Batch) -> None:
        self.batches += 1
        if batch.HasField("hello"):
            if self.hello is not None:
                self.violations.append("sent a second Hello on the stream")
            self.hello = batch.hello
            self.peer_window = batch.hello.initial_window or wire.DEFAULT_WINDOW
            agreed = min(self.protocol, batch.hello.protocol or 1)
            self.overhead = wire.frame_overhead(agreed)
        elif self.hello is None:
            self.violations.append("sent frames before its Hello")
            self.hello = pb.Hello()  # go on checking the rest
            self.peer_window = wire.DEFAULT_WINDOW
        grants: dict[str, int] = {}
        for f in batch.frames:
            kind = f.WhichOneof("kind")
            mark = f.mark
            if kind == "ping":
                if f.ping.reply:
                    self.pongs[f.ping.id] = time.monotonic()
                else:  # upstreams need not ping; a node answers anyway
                    self.unexpected_pings += 1
                    r = self.writer.frame()
                    r.ping.id = f.ping.id
                    r.ping.reply = True
                    self.writer.kick()
                continue
            if kind == "data":
                cost = len(f.data.payload) + self.overhead
                before = self.spent.get(mark, 0)
                allowed = self.granted.get(mark, self.window)
                if before >= allowed:
                    self.violations.append(
                        f"sent mark {mark} a Data frame with no credit left: {before:,} credit "
                        f"bytes spent of {allowed:,} granted (payload + {self.overhead} per frame)"
                    )
                self.spent[mark] = before + cost
                self._ack(mark, f.data.acked)
                if self.auto_grant:
                    grants[mark] = grants.get(mark, 0) + cost
            elif kind == "flow":
                if f.flow.credit:
                    self.send_credit[mark] = self.send_credit.get(mark, 0) + f.flow.credit
                    self.credit_in[mark] = self.credit_in.get(mark, 0) + f.flow.credit
                self._ack(mark, f.flow.acked)
            if self.held >= MAX_HELD_FRAMES:
                self.violations.append(f"sent more than {MAX_HELD_FRAMES:,} frames unasked")
                continue
            self.frames.setdefault(mark, deque()).append(f)
            self.held += 1
        for mark, credit in grants.items():
            self.grant(mark, credit)

    def _ack(self, mark: str, acked: int) -> None:
        if not acked:
            return
        sent = self.seq.get(mark, 0)
        if acked > sent:
            self.violations.append(
                f"acknowledged seq {acked} of mark {mark}, but the kit has sent only up to {sent}"
            )
        if acked > self.acked.get(mark, 0):
            self.acked[mark] = acked

    # -- sending ------------------------------------------------------------

    def open(
        self, mark: str, *, next_seq: int = 1, resumed: bool = False, **fields: object
    ) -> None:
        f = self.writer.frame()
        f.mark = mark
        o = f.open
        o.service = "conformance"
        o.node_id = self.node_id
        o.next_seq = next_seq
        o.resumed = resumed
        o.client_addr = "127.0.0.1"
        o.framing = "raw"
        for name, value in fields.items():
            if isinstance(value, dict):
                getattr(o, name).update(value)
            else:
                setattr(o, name, value)
        self.seq[mark] = next_seq - 1
        self.granted.setdefault(mark, self.window)
        self.send_credit.setdefault(mark, self.peer_window or wire.DEFAULT_WINDOW)
        self.writer.kick()

    def data(self, mark: str, payload: bytes, *, seq: int | None = None) -> int:
        """Queue one Data frame now (no credit wait); its seq."""
        if seq is None:
            seq = self.seq.get(mark, 0) + 1
        self.seq[mark] = max(seq, self.seq.get(mark, 0))
        cost = len(payload) + self.overhead
        self.send_credit[mark] = self.send_credit.get(mark, self.peer_window) - cost
        self.kit_spent[mark] = self.kit_spent.get(mark, 0) + cost
        f = self.writer.frame()
        f.mark = mark
        f.data.seq = seq
        f.data.payload = payload
        self.writer.add_payload(len(payload))
        self.writer.kick()
        return seq

    async def send(self, mark: str, payload: bytes) -> int:
        """Send one Data frame once the upstream's credit allows it (the
        node's rule: while the mark's credit is positive); its seq."""
        await self.until(
            lambda: self.send_credit.get(mark, self.peer_window) > 0,
            lambda: (
                f"granted no credit for mark {mark} in {self.timeout:g} s after the kit "
                f"had spent {self.kit_spent.get(mark, 0):,} credit bytes of its window "
                f"{self.peer_window:,} + {self.credit_in.get(mark, 0):,} granted (Flow.credit "
                "must come back as messages are handled)"
            ),
        )
        return self.data(mark, payload)

    def close_mark(self, mark: str, reason: str, detail: str = "") -> None:
        f = self.writer.frame()
        f.mark = mark
        f.close.reason = reason
        if detail:
            f.close.detail = detail
        self.writer.kick()

    def grant(self, mark: str, credit: int) -> None:
        self.granted[mark] = self.granted.get(mark, self.window) + credit
        f = self.writer.frame()
        f.mark = mark
        f.flow.credit = credit
        self.writer.kick()

    def ping(self, ping_id: int) -> None:
        f = self.writer.frame()
        f.ping.id = ping_id
        self.writer.kick()

    async def write_raw(self, data: bytes) -> None:
        """Write one gRPC message of exactly these bytes, outside the batcher."""
        await self.stream.write(cast(pb.Batch, _Raw(data)))

    # -- waiting --------------------------------------------------------------

    def check(self) -> None:
        if self.violations:
            raise CaseFailed(self.violations[0])

    async def until(
        self,
        done: Callable[[], bool],
        failure: str | Callable[[], str],
        timeout: float | None = None,
    ) -> None:
        """Wait until ``done()``; fail with ``failure`` (or what it returns,
        computed then) at the deadline or if the stream ends first. Contract
        violations fail at once."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.check()
            if done():
                return
            if self.ended or time.monotonic() >= deadline:
                line = failure if isinstance(failure, str) else failure()
                raise CaseFailed(f"{line}; {self.ended}" if self.ended else line)
            left = deadline - time.monotonic()
            self._changed.clear()
            await wait_event(self._changed, left)

    async def quiet(self, seconds: float = QUIET) -> None:
        """Watch for ``seconds`` in which violations may still show up."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.ended:
            self._changed.clear()
            await wait_event(self._changed, left)
            self.check()
        self.check()

    async def wait_hello(self) -> pb.Hello:
        await self.until(
            lambda: self.hello is not None,
            f"did not answer the kit's Hello with its own within {self.timeout:g} s "
            "(a node gives up on the link and reconnects)",
        )
        assert self.hello is not None
        return self.hello

    async def frame(self, mark: str, what: str, timeout: float | None = None) -> pb.Frame:
        """The next data, close or meta frame of ``mark`` (flow frames are
        accounted and skipped)."""

        def ready() -> bool:
            q = self.frames.get(mark)
            while q and q[0].WhichOneof("kind") == "flow":
                q.popleft()
                self.held -= 1
            return bool(q)

        timeout = self.timeout if timeout is None else timeout
        await self.until(
            ready, f"did not send {what} for mark {mark} within {timeout:g} s", timeout
        )
        self.held -= 1
        return self.frames[mark].popleft()

    def pending(self, mark: str) -> list[str]:
        """Kinds of the data, close and meta frames of ``mark`` not taken yet."""
        kinds: list[str] = []
        for f in self.frames.get(mark, ()):
            kind = f.WhichOneof("kind")
            if kind is not None and kind != "flow":
                kinds.append(kind)
        return kinds

    async def reply(self, mark: str, what: str, timeout: float | None = None) -> pb.Data:
        """The next Data frame of ``mark``; a close or meta in its place fails."""
        f = await self.frame(mark, what, timeout)
        kind = f.WhichOneof("kind")
        if kind == "close":
            raise CaseFailed(
                f"closed mark {mark} ({f.close.reason or 'no reason'}"
                f"{': ' + f.close.detail if f.close.detail else ''}) instead of sending {what}"
            )
        if kind != "data":
            raise CaseFailed(f"sent a {kind} frame for mark {mark} where {what} was expected")
        return f.data

    async def echo(self, mark: str, payload: bytes, timeout: float | None = None) -> pb.Data:
        """Send ``payload`` and expect it back unchanged."""
        await self.send(mark, payload)
        got = await self.reply(mark, f"the echo of {show(payload)}", timeout)
        if got.payload != payload:
            raise CaseFailed(
                f"answered {show(got.payload)} to {show(payload)} on mark {mark} "
                "(is the upstream running its conformance handler? see " + DOC + ")"
            )
        return got


def show(payload: bytes, limit: int = 40) -> str:
    text = repr(payload[:limit])
    return text + (f"... ({len(payload):,} bytes)" if len(payload) > limit else "")
