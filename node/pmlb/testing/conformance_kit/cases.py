"""The cases: one per rule of the Bridge contract, each linked to its section
of proto/README.md (tests/unit/test_conformance_doc.py keeps them in step).

A case gets a Kit (streams to the upstream, fresh marks of one node id) and
raises CaseFailed with one line saying what the upstream did."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol import reasons, wire
from pmlb.protocol.ids import MarkFactory
from pmlb.testing.conformance_kit.peer import (
    CaseFailed,
    Options,
    Peer,
    show,
)
from pmlb.transport import (
    HEALTH_SERVICE,
    TransportError,
    open_client,
)


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
            raise CaseFailed(f"answered !info with {show(raw)}, not JSON") from None
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
                    f"mark {m}: the reply to seq {seq} was {show(got.payload)}, "
                    f"expected {show(p)} (frames of one mark must stay in order)"
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
                raise CaseFailed(f"flood message {i} arrived as {show(payload)}: out of order")


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
                f"{show(got.payload)}: seq 7 was handled twice (skip seq values already seen)"
                if got.payload == b"seven"
                else f"after a resumed Open at next_seq 6 the reply for seq {seq} was "
                f"{show(got.payload)}"
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
            raise CaseFailed(f"sent {show(got.payload)} before closing, not the echo")
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
            raise CaseFailed(f"sent {show(got.payload)} where {want!r} was due before the close")
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
            raise CaseFailed(f"pushed {show(got.payload)} to {target}, asked for {show(text)}")
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
        raise CaseFailed(f"answered {show(got.payload)} to a Data frame with an unknown field")
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
        raise CaseFailed(f"the sleeping mark answered {show(reply.payload)}")


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
                raise CaseFailed(f"mark {m} got {show(got.payload)} where {show(want)} was due")
