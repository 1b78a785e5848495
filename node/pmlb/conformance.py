"""``pmlb conformance HOST:PORT``: check an upstream against the Bridge contract.

The kit plays a node. It opens Bridge streams with the node's own transport
code (``pmlb.transport.open_client``), writes frames with the node's message
types and Hello, and reads the upstream's answers the way a link does, so the
kit and the node cannot drift apart. Each named case drives one part of the
contract (proto/README.md, one section per case) on fresh streams and says in
one line what a failing upstream did.

The upstream's application must be its *conformance handler*: it echoes every
message unchanged and obeys a few ``!`` commands (``!info``, ``!flood N SIZE``,
...; ``pmlb.upstream.conformance`` is the Python one, and proto/README.md lists
them). That is how the kit makes an upstream send, close, push, set metadata
and raise on demand.

What the kit checks on every stream, whatever the case, and fails the case on
at once: the first Batch carries the Hello and no later one does; the upstream
sends a mark's Data only while the credit the kit granted for it is positive
(each frame costs payload + 64 with protocol 2, so one frame may take the
credit below zero, as the node's own sending does); it never acknowledges a
seq the kit did not send.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import grpc

from pmlb import __version__, reasons, wire
from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.aio import wait_event
from pmlb.errors import PmlbError
from pmlb.ids import MarkFactory
from pmlb.transport import (
    HEALTH_SERVICE,
    TRANSPORTS,
    ClientStream,
    ClientTLS,
    TransportError,
    client_ssl_context,
    open_client,
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
    transport: str = "grpclib"
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
        got = await self.reply(mark, f"the echo of {_show(payload)}", timeout)
        if got.payload != payload:
            raise CaseFailed(
                f"answered {_show(got.payload)} to {_show(payload)} on mark {mark} "
                "(is the upstream running its conformance handler? see " + DOC + ")"
            )
        return got


def _show(payload: bytes, limit: int = 40) -> str:
    text = repr(payload[:limit])
    return text + (f"... ({len(payload):,} bytes)" if len(payload) > limit else "")


# -- the cases ------------------------------------------------------------------


class Kit:
    """What a case gets: streams to the upstream and fresh marks."""

    def __init__(self, options: Options, case_index: int) -> None:
        self.options = options
        self.node_id = f"{options.node_id}-{case_index}"
        self.marks = MarkFactory(self.node_id)
        self.peers: list[Peer] = []

    def mark(self) -> str:
        return self.marks.next()

    def stream(
        self,
        *,
        window: int = wire.DEFAULT_WINDOW,
        protocol: int = wire.PROTOCOL_VERSION,
        auto_grant: bool = True,
        hello: bool = True,
        node_id: str | None = None,
    ) -> Peer:
        opts = self.options
        stream = open_client(
            opts.transport,
            opts.target,
            tls=opts.tls,
            metadata={"authorization": f"Bearer {opts.token}"} if opts.token else {},
        )
        peer = Peer(
            stream,
            node_id=node_id or self.node_id,
            window=window,
            protocol=protocol,
            auto_grant=auto_grant,
            timeout=opts.timeout,
        )
        peer.start(hello)
        self.peers.append(peer)
        return peer

    async def ready(self, **kw: object) -> Peer:
        """A stream whose Hello exchange is done."""
        peer = self.stream(**kw)  # type: ignore[arg-type]
        await peer.wait_hello()
        return peer

    async def health(self, service: str) -> tuple[bool, str]:
        from pmlb.transport.cgrpc import check_health

        opts = self.options
        if opts.tls is not None:
            ctx_files = opts.tls
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ctx_files.ca),
                private_key=_read(ctx_files.key),
                certificate_chain=_read(ctx_files.cert),
            )
            channel = grpc.aio.secure_channel(opts.target, creds)
        else:
            channel = grpc.aio.insecure_channel(opts.target)
        try:
            return await check_health(channel, service, opts.timeout)
        finally:
            await channel.close(None)

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()
        self.peers.clear()


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


CaseFn = Callable[[Kit], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    name: str
    section: str  # anchor in proto/README.md
    checks: str  # what a passing upstream does, one line
    run: CaseFn
    timeout: float = 30.0


CASES: list[Case] = []


def case(name: str, section: str, checks: str, timeout: float = 30.0) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        CASES.append(Case(name, section, checks, fn, timeout))
        return fn

    return register


@case("hello", "1-hello-and-version-negotiation", "answers Hello with its own, before any frame")
async def _hello(kit: Kit) -> None:
    peer = kit.stream()
    hello = await peer.wait_hello()
    if hello.protocol not in (1, 2):
        raise CaseFailed(f"its Hello says protocol {hello.protocol}; this contract defines 1 and 2")
    m = kit.mark()
    peer.open(m)
    await peer.echo(m, b"hello")
    await peer.quiet()


@case(
    "version",
    "1-hello-and-version-negotiation",
    "works with a node speaking protocol 1 and with one speaking a later version",
)
async def _version(kit: Kit) -> None:
    for protocol in (1, 3):
        peer = kit.stream(protocol=protocol)
        try:
            await peer.wait_hello()
            m = kit.mark()
            peer.open(m)
            # Protocol 1 charges no per-frame overhead: an upstream that keeps
            # charging 64 is only slower, one that charges nothing at 2 is wrong
            # (checked by credit-respected).
            await peer.echo(m, b"version %d" % protocol)
        except CaseFailed as exc:
            raise CaseFailed(f"with a node Hello of protocol {protocol}: {exc}") from None


@case("health", "2-health", 'answers grpc.health.v1 Check for "pmlb.v1.Upstream" and "" SERVING')
async def _health(kit: Kit) -> None:
    for service in (HEALTH_SERVICE, ""):
        ok, detail = await kit.health(service)
        if not ok:
            raise CaseFailed(f"health Check for service {service!r} answered {detail}")


@case("open", "3-open-with-metadata", "hands the handler every Open field, metadata included")
async def _open(kit: Kit) -> None:
    peer = await kit.ready()
    fresh, moved = kit.mark(), kit.mark()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sent: dict[str, Any] = {
        "service": "conformance",
        "client_addr": "203.0.113.7",
        "client_port": 51234,
        "node_id": peer.node_id,
        "framing": "line",
        "accepted_at_unix_ms": 1796001341198,
        "trace_context": {"traceparent": traceparent},
    }
    peer.open(fresh, **sent)
    peer.open(moved, resumed=True, next_seq=4, metadata={"user": "ada", "lang": "en"}, **sent)
    for mark, resumed, metadata, seq in (
        (fresh, False, {}, 1),
        (moved, True, {"user": "ada", "lang": "en"}, 4),
    ):
        await peer.send(mark, b"!info")
        raw = (await peer.reply(mark, "the !info reply")).payload
        try:
            seen = json.loads(raw)
        except ValueError:
            raise CaseFailed(f"answered !info with {_show(raw)}, not JSON") from None
        expect = dict(sent, mark=mark, resumed=resumed, metadata=metadata, seq=seq)
        for key, value in expect.items():
            if seen.get(key) != value:
                raise CaseFailed(
                    f"the handler saw {key}={seen.get(key)!r} on mark {mark}; "
                    f"the Open said {value!r}"
                )


@case(
    "data",
    "4-data-both-ways-acknowledgements-riding-on-replies",
    "echoes in order per mark, acks riding on the replies",
)
async def _data(kit: Kit) -> None:
    peer = await kit.ready()
    marks = [kit.mark() for _ in range(3)]
    for m in marks:
        peer.open(m)
    payloads = [b"", bytes(range(256)), b"x" * 65_535, b"third", b"\x00\xff" * 10]
    # Interleaved: one Batch carries frames of every mark.
    for p in payloads:
        for m in marks:
            peer.data(m, p)
    for m in marks:
        for seq, p in enumerate(payloads, 1):
            got = await peer.reply(m, f"the echo of seq {seq}")
            if got.payload != p:
                raise CaseFailed(
                    f"mark {m}: the reply to seq {seq} was {_show(got.payload)}, "
                    f"expected {_show(p)} (frames of one mark must stay in order)"
                )
            if got.acked < seq:
                raise CaseFailed(
                    f"mark {m}: the reply to seq {seq} carried acked={got.acked}; the "
                    "acknowledgement must ride on the reply it produced"
                )
    await peer.quiet()


@case(
    "ack-no-reply",
    "5-an-acknowledgement-for-a-frame-with-no-reply",
    "acknowledges a message that has no reply",
)
async def _ack_no_reply(kit: Kit) -> None:
    peer = await kit.ready()
    m = kit.mark()
    peer.open(m)
    await peer.echo(m, b"first")
    seq = await peer.send(m, b"!noreply nothing comes back")
    await peer.until(
        lambda: peer.acked.get(m, 0) >= seq,
        f"never acknowledged seq {seq} (a message with no reply) within {peer.timeout:g} s: "
        "the node keeps it for replay and closes the mark with replay_overflow",
    )
    if peer.pending(m):
        raise CaseFailed(
            f"answered a !noreply message with a {peer.frames[m][0].WhichOneof('kind')} frame"
        )


@case(
    "credit-respected",
    "6-credit-both-ways",
    "sends a mark no more than the node granted, counting 64 per frame",
)
async def _credit_respected(kit: Kit) -> None:
    window = 4096
    peer = await kit.ready(window=window, auto_grant=False)

    async def spends(m: str, allowed: int, label: str) -> None:
        # A conforming sender spends the whole grant (a frame may go while any
        # credit is left), then stops until more comes: the reader fails the
        # case on any frame sent with no credit left.
        await peer.until(
            lambda: peer.spent.get(m, 0) >= allowed,
            lambda: (
                f"{label}: sent {peer.spent.get(m, 0):,} of the {allowed:,} credit bytes "
                "granted, then stopped"
            ),
        )
        await peer.quiet()

    for count, size in ((64, 200), (200, 0)):
        m = kit.mark()
        peer.open(m)
        label = f"!flood {count} {size}"
        await peer.send(m, label.encode())
        await spends(m, window, label)
        peer.grant(m, window)
        await spends(m, 2 * window, label + " after Flow.credit")
        peer.grant(m, count * (size + peer.overhead))
        got: list[bytes] = []
        while len(got) < count:
            got.append((await peer.reply(m, f"flood message {len(got)} of {count}")).payload)
        for i, payload in enumerate(got):
            if payload[:6] != (b"%06d" % i)[:size]:
                raise CaseFailed(f"flood message {i} arrived as {_show(payload)}: out of order")


@case("credit-granted", "6-credit-both-ways", "grants the node credit back as it handles messages")
async def _credit_granted(kit: Kit) -> None:
    peer = await kit.ready()
    m = kit.mark()
    peer.open(m)
    window = peer.peer_window
    chunk = b"!noreply " + b"." * 16_000
    rounds = 3 * window // (len(chunk) + peer.overhead) + 1
    for _ in range(rounds):
        await peer.send(m, chunk)
    last = peer.seq[m]
    await peer.until(
        lambda: peer.acked.get(m, 0) >= last,
        f"acknowledged up to seq {peer.acked.get(m, 0)} of {last} within {peer.timeout:g} s",
    )


@case(
    "replay",
    "7-resumed-open-and-replay-failover-drain",
    "continues a resumed mark at next_seq and skips a seq it has handled",
)
async def _replay(kit: Kit) -> None:
    peer = await kit.ready()
    m = kit.mark()
    peer.open(m, resumed=True, next_seq=6, metadata={"user": "ada"})
    peer.data(m, b"six", seq=6)
    peer.data(m, b"seven", seq=7)
    peer.data(m, b"seven", seq=7)  # the same frame again: must not be handled twice
    peer.data(m, b"eight", seq=8)
    for seq, want in ((6, b"six"), (7, b"seven"), (8, b"eight")):
        got = await peer.reply(m, f"the echo of seq {seq}")
        if got.payload != want:
            raise CaseFailed(
                f"after a resumed Open at next_seq 6 the reply for seq {seq} was "
                f"{_show(got.payload)}: seq 7 was handled twice (skip seq values already seen)"
                if got.payload == b"seven"
                else f"after a resumed Open at next_seq 6 the reply for seq {seq} was "
                f"{_show(got.payload)}"
            )
        if got.acked < seq:
            raise CaseFailed(f"the reply to replayed seq {seq} carried acked={got.acked}")
    await peer.echo(m, b"nine")


@case(
    "close-from-node",
    "8-close-from-either-side-and-moved",
    "forgets a mark the node closed and answers with its close",
)
async def _close_from_node(kit: Kit) -> None:
    peer = await kit.ready()
    m, other, never = kit.mark(), kit.mark(), kit.mark()
    peer.open(m)
    peer.open(other)
    await peer.echo(m, b"before")
    peer.close_mark(m, reasons.CLIENT_CLOSED)
    f = await peer.frame(m, "a Close answering the node's")
    if f.WhichOneof("kind") != "close":
        raise CaseFailed(f"answered the node's Close with a {f.WhichOneof('kind')} frame")
    peer.data(m, b"after close")  # for a forgotten mark: ignored
    peer.close_mark(never, reasons.CLIENT_CLOSED)  # a mark it never had: ignored
    await peer.echo(other, b"still here")
    await peer.quiet()
    if peer.pending(m):
        raise CaseFailed(f"handled a message for mark {m} after the node closed it")


@case(
    "close-from-upstream",
    "8-close-from-either-side-and-moved",
    "closes a mark on request, replies first, with its reason",
)
async def _close_from_upstream(kit: Kit) -> None:
    peer = await kit.ready()
    for reason, detail in (("upstream_closed", "bye now"), ("logout", "")):
        m = kit.mark()
        peer.open(m)
        peer.data(m, b"last words")
        peer.data(m, f"!close {reason} {detail}".strip().encode())
        got = await peer.reply(m, "the echo before the close")
        if got.payload != b"last words":
            raise CaseFailed(f"sent {_show(got.payload)} before closing, not the echo")
        f = await peer.frame(m, "the Close !close asked for")
        if f.WhichOneof("kind") != "close":
            raise CaseFailed(f"sent a {f.WhichOneof('kind')} frame where a Close was due")
        if f.close.reason != reason or f.close.detail != detail:
            raise CaseFailed(
                f"closed with reason={f.close.reason!r} detail={f.close.detail!r}; "
                f"asked for {reason!r} {detail!r}"
            )


@case(
    "moved",
    "8-close-from-either-side-and-moved",
    "answers Close moved with its pending replies, then its close",
)
async def _moved(kit: Kit) -> None:
    peer = await kit.ready()
    m = kit.mark()
    peer.open(m)
    peer.data(m, b"one")
    peer.data(m, b"!sleep 300")
    last = peer.data(m, b"three")
    peer.close_mark(m, reasons.MOVED)
    for want in (b"one", b"slept", b"three"):
        got = await peer.reply(m, f"{want.decode()!r} before answering moved")
        if got.payload != want:
            raise CaseFailed(f"sent {_show(got.payload)} where {want!r} was due before the close")
    if peer.acked.get(m, 0) < last:
        raise CaseFailed(
            f"closed a moved mark with seq {last} unacknowledged (it will be replayed)"
        )
    f = await peer.frame(m, "a Close answering moved")
    if f.WhichOneof("kind") != "close":
        raise CaseFailed(f"sent a {f.WhichOneof('kind')} frame where its close was due")


@case(
    "push",
    "9-push-to-another-mark-of-the-same-node",
    "sends to another mark of the node over the link",
)
async def _push(kit: Kit) -> None:
    peer = await kit.ready()
    m, here, elsewhere = kit.mark(), kit.mark(), kit.mark()
    peer.open(m)
    peer.open(here)
    for target in (here, elsewhere):  # bound to this upstream / bound to another one
        text = b"for " + target.encode()
        await peer.send(m, b"!push " + target.encode() + b" " + text)
        got = await peer.reply(target, f"the data !push sent to {target}")
        if got.payload != text:
            raise CaseFailed(f"pushed {_show(got.payload)} to {target}, asked for {_show(text)}")
    # The node does not hold ``elsewhere`` in this kit: it answers as a node does.
    peer.close_mark(elsewhere, reasons.UNKNOWN_MARK)
    await peer.echo(m, b"after unknown_mark")


@case("meta", "10-setmeta", "sends Meta set and unset")
async def _meta(kit: Kit) -> None:
    peer = await kit.ready()
    m = kit.mark()
    peer.open(m)
    await peer.send(m, b"!meta user=ada")
    f = await peer.frame(m, "the Meta !meta asked for")
    if f.WhichOneof("kind") != "meta" or dict(f.meta.set) != {"user": "ada"}:
        raise CaseFailed(f"answered !meta user=ada with {f}".replace("\n", " "))
    await peer.send(m, b"!unmeta user")
    f = await peer.frame(m, "the Meta !unmeta asked for")
    if f.WhichOneof("kind") != "meta" or list(f.meta.unset) != ["user"]:
        raise CaseFailed(f"answered !unmeta user with {f}".replace("\n", " "))


@case(
    "large-batch",
    "11-oversized-and-broken-input",
    "accepts a 9 MiB gRPC message (the node sends up to 64 MiB; gRPC's usual default is 4 MiB)",
)
async def _large_batch(kit: Kit) -> None:
    peer = await kit.ready()
    marks = [kit.mark() for _ in range(48)]
    for m in marks:
        peer.open(m)
    payload = b"L" * 65_535
    batch = pb.Batch()
    for m in marks:
        for _ in range(3):
            peer.seq[m] += 1
            peer.send_credit[m] -= len(payload) + peer.overhead
            f = batch.frames.add()
            f.mark = m
            f.data.seq = peer.seq[m]
            f.data.payload = payload
    await peer.writer.close(peer.timeout)  # the opens first, then the big one alone
    size = batch.ByteSize()
    try:
        await peer.stream.write(batch)
    except TransportError as exc:
        raise CaseFailed(
            f"refused a {size / 2**20:.1f} MiB Batch: {exc} (raise the gRPC receive limit "
            "to 64 MiB)"
        ) from None
    for m in marks:
        for i in range(3):
            try:
                got = await peer.reply(
                    m, f"echo {i + 1} of 3 from the {size / 2**20:.1f} MiB Batch", 15.0
                )
            except CaseFailed as exc:
                raise CaseFailed(f"{exc} (raise the gRPC receive limit to 64 MiB)") from None
            if got.payload != payload:
                raise CaseFailed(f"echoed {len(got.payload):,} bytes of a 65,535-byte message")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@case(
    "garbage",
    "11-oversized-and-broken-input",
    "drops a message that is not a Batch and ignores unknown fields and kinds, keeping the stream",
)
async def _garbage(kit: Kit) -> None:
    peer = await kit.ready()
    m, stranger = kit.mark(), kit.mark()
    peer.open(m)
    await peer.echo(m, b"before")
    await peer.writer.close(peer.timeout)
    steps: Iterable[tuple[str, bytes]] = (
        ("a message that is not a Batch", b"\xff\xff\xff\xff not protobuf"),
        (
            "a Frame of a kind it does not know (field 15)",
            _field(2, _field(1, m.encode()) + _field(15, b"future")),
        ),
        ("a Batch field it does not know (field 9)", _field(9, b"future")),
        (
            "data for a mark it never opened",
            pb.Batch(
                frames=[pb.Frame(mark=stranger, data=pb.Data(seq=1, payload=b"?"))]
            ).SerializeToString(),
        ),
    )
    for what, data in steps:
        try:
            await peer.write_raw(data)
        except TransportError as exc:
            raise CaseFailed(f"could not take {what}: {exc}") from None
    # A Data frame with a field it does not know still reaches the handler.
    seq = peer.seq[m] + 1
    peer.seq[m] = seq
    data = pb.Data(seq=seq, payload=b"with a new field").SerializeToString() + _field(9, b"x")
    await peer.write_raw(_field(2, _field(1, m.encode()) + _field(3, data)))
    try:
        got = await peer.reply(m, "the echo of a Data frame carrying an unknown field")
    except CaseFailed as exc:
        raise CaseFailed(f"{exc} (after {', '.join(w for w, _ in steps)})") from None
    if got.payload != b"with a new field":
        raise CaseFailed(f"answered {_show(got.payload)} to a Data frame with an unknown field")
    if peer.pending(stranger):
        raise CaseFailed(f"answered data for mark {stranger}, which the node never opened")


@case(
    "protocol-error",
    "11-oversized-and-broken-input",
    "ends a stream that starts without Hello with an error status, and keeps serving",
)
async def _protocol_error(kit: Kit) -> None:
    bad = kit.stream(hello=False)
    m = kit.mark()
    bad.open(m)
    bad.data(m, b"no hello first")
    await bad.until(
        lambda: bad.ended is not None and "status OK" not in bad.ended,
        f"kept a stream open for {bad.timeout:g} s whose first Batch had no Hello "
        "(end it with a gRPC error status, e.g. INVALID_ARGUMENT)"
        if bad.ended is None
        else "ended a stream without Hello with status OK: use an error status",
    )
    if bad.pending(m):
        raise CaseFailed("handled frames of a stream that never said Hello")
    ok, detail = await kit.health(HEALTH_SERVICE)
    if not ok:
        raise CaseFailed(f"health after the bad stream: {detail}")
    peer = await kit.ready()
    m2 = kit.mark()
    peer.open(m2)
    await peer.echo(m2, b"a new stream works")


@case(
    "handler-error",
    "11-oversized-and-broken-input",
    "closes only the mark whose handler raised, with upstream_error",
)
async def _handler_error(kit: Kit) -> None:
    peer = await kit.ready()
    m, other = kit.mark(), kit.mark()
    peer.open(m)
    peer.open(other)
    await peer.send(m, b"!raise")
    f = await peer.frame(m, "a Close after its handler raised")
    if f.WhichOneof("kind") != "close" or f.close.reason != reasons.UPSTREAM_ERROR:
        raise CaseFailed(
            f"answered a handler that raised with {f}".replace("\n", " ")
            + f" (expected close reason {reasons.UPSTREAM_ERROR!r})"
        )
    await peer.echo(other, b"the others carry on")


# The ping case's busy handler, and how late its ping answer may be.
SLEEP_MS: Final = 1000
PING_LATE: Final = 0.5


@case("ping", "12-liveness-ping", "answers Ping at once, even while a handler is busy")
async def _ping(kit: Kit) -> None:
    peer = await kit.ready()
    slow, fast = kit.mark(), kit.mark()
    peer.open(slow)
    peer.open(fast)
    await peer.send(slow, b"!sleep %d" % SLEEP_MS)
    sent = time.monotonic()
    peer.ping(17)
    waited = peer.timeout + SLEEP_MS / 1000
    await peer.until(
        lambda: 17 in peer.pongs,
        f"did not answer Ping 17 within {waited:g} s (answer pings from the reader)",
        waited,
    )
    took = peer.pongs[17] - sent
    if took > PING_LATE:
        raise CaseFailed(
            f"answered Ping after {took:.1f} s while a handler slept {SLEEP_MS / 1000:g} s: "
            "answer pings from "
            "the reader, not behind handlers"
        )
    await peer.echo(fast, b"not behind the sleeper")
    if peer.pending(slow):
        raise CaseFailed("the sleeping mark answered before the sleep ended")
    reply = await peer.reply(slow, "'slept' after the sleep", waited)
    if reply.payload != b"slept":
        raise CaseFailed(f"the sleeping mark answered {_show(reply.payload)}")


@case(
    "many-marks",
    "13-many-marks-on-one-stream",
    "serves 1,000 marks interleaved on one stream, each in order",
)
async def _many_marks(kit: Kit) -> None:
    peer = await kit.ready()
    marks = [kit.mark() for _ in range(1000)]
    for m in marks:
        peer.open(m)
    for i in range(3):
        for m in marks:
            peer.data(m, b"%s %d" % (m.encode(), i))
    for m in marks:
        for i in range(3):
            want = b"%s %d" % (m.encode(), i)
            got = await peer.reply(m, f"message {i} of mark {m}", 20.0)
            if got.payload != want:
                raise CaseFailed(f"mark {m} got {_show(got.payload)} where {_show(want)} was due")


# -- running ------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    passed: bool
    line: str
    seconds: float


async def run_case(options: Options, index: int, c: Case) -> Result:
    kit = Kit(options, index)
    started = time.monotonic()
    try:
        async with asyncio.timeout(c.timeout):
            await c.run(kit)
        return Result(c, True, c.checks, time.monotonic() - started)
    except CaseFailed as exc:
        return Result(c, False, str(exc), time.monotonic() - started)
    except TimeoutError:
        return Result(c, False, f"the case did not finish within {c.timeout:.0f} s", c.timeout)
    except (TransportError, grpc.aio.AioRpcError, OSError) as exc:
        return Result(c, False, f"the connection failed: {exc}", time.monotonic() - started)
    finally:
        await kit.close()


async def run_cases(options: Options, names: list[str] | None = None) -> list[Result]:
    chosen = [c for c in CASES if not names or c.name in names]
    results = []
    for i, c in enumerate(chosen):
        results.append(await run_case(options, i, c))
    return results


def report(results: list[Result], out: Callable[[str], None]) -> None:
    width = max(len(r.case.name) for r in results)
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        out(f"{status}  {r.case.name:<{width}}  {r.line}  [{r.seconds:.2f}s]")
        if not r.passed:
            out(f"      {'':<{width}}  see {DOC}#{r.case.section}")
    failed = sum(not r.passed for r in results)
    out(f"{len(results) - failed} passed, {failed} failed")


# -- command line -----------------------------------------------------------------


def add_conformance_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "conformance",
        help="check an upstream against the Bridge contract, case by case",
        description="Connect to an upstream as a node would and run every case of the "
        "Bridge contract against it. The upstream must run its conformance handler "
        "(pmlb echo-upstream --conformance; see proto/README.md). Exit 0 only if every "
        "case passes.",
    )
    p.add_argument("target", metavar="HOST:PORT", nargs="?", help="the upstream's gRPC address")
    p.add_argument(
        "--link-transport",
        choices=TRANSPORTS,
        default="grpclib",
        help="gRPC implementation the kit uses (default grpclib, the node's default)",
    )
    p.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="NAME",
        help="run only this case (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--timeout",
        type=float,
        default=ANSWER_TIMEOUT,
        help=f"seconds an answer may take (default {ANSWER_TIMEOUT:g}, the node's --ack-timeout)",
    )
    p.add_argument("--upstream-token", help="present this token, as the node's --upstream-token")
    p.add_argument("--tls-ca", help="verify the upstream's TLS certificate with this CA (PEM)")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--tls-key", help="key (PEM) for --tls-cert")


def run_conformance(args: argparse.Namespace) -> int:
    from pmlb.errors import ConfigError

    if args.list:
        for c in CASES:
            print(f"{c.name:<20} {c.checks}  ({DOC}#{c.section})")
        return 0
    if not args.target:
        raise ConfigError("give the upstream's HOST:PORT")
    unknown = sorted(set(args.cases or ()) - {c.name for c in CASES})
    if unknown:
        raise ConfigError(f"unknown case {', '.join(unknown)}: see --list")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
        client_ssl_context(tls)  # bad files: a clear error now
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    options = Options(
        args.target, args.link_transport, tls, args.upstream_token, timeout=args.timeout
    )
    print(f"pmlb conformance {args.target} ({args.link_transport}, node id {options.node_id})")
    results = asyncio.run(run_cases(options, args.cases))
    report(results, print)
    sys.stdout.flush()
    return 0 if all(r.passed for r in results) else 1
