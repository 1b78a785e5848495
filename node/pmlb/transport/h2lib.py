"""Bridge streams on grpclib (pure-Python gRPC on asyncio + h2):
``--link-transport grpclib``.

grpclib runs in the event loop itself, with no poller thread to hand frames
across, which is what makes it cheaper per frame than grpc.aio in the node's
pattern (many small frames batched, several writes in flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, cast

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpclib.client import Channel
from grpclib.client import Stream as ClientCall
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.server import Server as GServer
from grpclib.server import Stream as ServerCall

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol import wire
from pmlb.protocol.domain import parse_hostport
from pmlb.transport.base import (
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    MAX_FRAME_SIZE,
    BridgeHandler,
    ClientTLS,
    Refused,
    ServerTLS,
    StreamEnded,
    TransportError,
    client_ssl_context,
    server_ssl_context,
)
from pmlb.transport.libpatch import (
    LIBRARY_RECV_MESSAGE,
    advertise_max_frame,
    install,
    patient_keepalive,
    raise_status,
)
from pmlb.transport.tcpinfo import PROGRESS_BYTES, Progress

# hpack logs every header it encodes or decodes at DEBUG, the upstream
# token's "authorization: Bearer ..." among them: never below INFO, whatever
# --log-level (or an application embedding the SDK) sets. Secrets are never
# logged (README, "Security").
logging.getLogger("hpack").setLevel(logging.INFO)

log = logging.getLogger("pmlb.transport")


# What the codec returns for a message that is not a Batch: grpclib takes None
# for the end of the stream, so garbage needs a value of its own.
_GARBAGE: Final = object()
# The errors grpclib (and the sockets under it) raise when a stream breaks.
_BROKEN = (GRPCError, StreamTerminatedError, ProtocolError, ConnectionError, OSError)

CLIENT_CONFIG: Final = Configuration(
    _keepalive_time=KEEPALIVE_TIME,
    _keepalive_timeout=KEEPALIVE_TIMEOUT,
    _keepalive_permit_without_calls=True,
    _http2_max_pings_without_data=0,
    _http2_min_sent_ping_interval_without_data=KEEPALIVE_TIME,
)
SERVER_CONFIG: Final = Configuration(
    _keepalive_time=None,  # the node pings; an upstream need not
)


def _big_frames(protocol: H2Protocol) -> H2Protocol:
    return advertise_max_frame(protocol, MAX_FRAME_SIZE)


class _Channel(Channel):
    """One link's connection, with what its hung-peer watchdog needs
    (``tcpinfo.Progress``: when a period last moved data either way)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = Progress()

    def _protocol_factory(self) -> H2Protocol:
        protocol = _big_frames(super()._protocol_factory())
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            made(transport)
            self.progress.attach(transport.get_extra_info("socket"))
            self._patient_keepalive(protocol)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol

    def _patient_keepalive(self, protocol: H2Protocol) -> None:
        """grpclib closes a connection whose keepalive PING is not answered
        within KEEPALIVE_TIMEOUT. On a slow, busy link the answer waits behind
        seconds of data: when the connection moved PROGRESS_BYTES either way
        meanwhile, wait another KEEPALIVE_TIMEOUT instead (the partition
        suite's slow-link case fails if this stops working)."""
        patient_keepalive(
            protocol,
            KEEPALIVE_TIME,
            KEEPALIVE_TIMEOUT,
            self.progress.moved,
            PROGRESS_BYTES,
            f"{self._host}:{self._port}",
        )

    def tcp_state(self) -> str:
        return self.progress.tcp_state()

    def last_data(self) -> float:
        return self.progress.last_data()


class _GServer(GServer):
    def _protocol_factory(self) -> H2Protocol:
        return _big_frames(super()._protocol_factory())


class _Codec(CodecBase):
    """Protobuf, except that a message which is not a Batch never raises
    (grpclib would end the stream, taking every mark on it): it decodes to
    _GARBAGE and the reader counts and drops it. Oversized messages never get
    here: _recv_message drops them by their length prefix."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message.SerializeToString()  # type: ignore[no-any-return]

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is not pb.Batch:
            return message_type.FromString(data)
        try:
            return pb.Batch.FromString(data)
        except DecodeError:
            return _GARBAGE


# An oversized message is read and dropped in pieces of this size.
SKIP_PIECE: Final = 1 << 16


async def _recv_message(stream: Any, codec: CodecBase, message_type: Any) -> Any:
    """grpclib's recv_message for our streams, bounded by the length prefix.

    grpclib reads the whole length a message's 5-byte prefix declares (up to
    4 GiB) before the codec sees a byte: one hostile peer could grow the node
    or an SDK upstream by gigabytes with one message. Here a message declared
    over GRPC_MAX_MESSAGE is read and dropped in SKIP_PIECE pieces as it
    arrives, never held; the reader gets _GARBAGE for it (counted and dropped
    like any other garbage Batch), and the stream and its marks carry on.
    Streams of other codecs (other grpclib users in the process) keep
    grpclib's own function (libpatch installs this one where grpclib looks
    it up; tests/integration/test_bridge_length_prefix.py fails if it stops
    working).
    """
    if not isinstance(codec, _Codec):
        return await LIBRARY_RECV_MESSAGE(stream, codec, message_type)
    try:
        meta = await stream.recv_data(5)
        if not meta:
            return None
        if meta[0]:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not accepted")
        size = int.from_bytes(meta[1:5], "big")
        if size <= wire.GRPC_MAX_MESSAGE:
            return codec.decode(await stream.recv_data(size), message_type)
        left = size
        while left:
            left -= len(await stream.recv_data(min(left, SKIP_PIECE)))
    except AssertionError:  # grpclib's Buffer: the stream ended inside a message
        raise StreamTerminatedError("the stream ended inside a message") from None
    # The reader logs and counts the garbage with its peer; this says why.
    log.warning("dropped a message of %d bytes (over %d) unread", size, wire.GRPC_MAX_MESSAGE)
    if message_type is not pb.Batch:
        raise GRPCError(Status.RESOURCE_EXHAUSTED, f"message of {size} bytes is over the limit")
    return _GARBAGE


install(_recv_message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Client:
    __slots__ = ("_call", "_cancelled", "_channel", "_started")

    def __init__(self, channel: Channel, call: ClientCall[pb.Batch, pb.Batch]) -> None:
        self._channel = channel
        self._call = call
        self._started: asyncio.Future[None] | None = None
        self._cancelled = False

    async def _start(self) -> None:
        """Connect and send the request headers, once, for whoever comes first
        (the reader may be waiting before the writer has sent anything)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._open())
        await asyncio.shield(self._started)

    async def _open(self) -> None:
        await self._call.__aenter__()
        await self._call.send_request()

    async def write(self, batch: pb.Batch) -> None:
        if self._cancelled:
            raise TransportError("cancelled")
        try:
            await self._start()
            await self._call.send_message(batch)
        except _BROKEN as exc:
            raise TransportError(_describe(exc)) from None

    async def read(self) -> pb.Batch | None:
        if self._cancelled:
            raise TransportError("cancelled")
        try:
            await self._start()
            msg = await self._call.recv_message()
        except _BROKEN as exc:
            raise TransportError("cancelled" if self._cancelled else self._status(exc)) from None
        if msg is None:
            # The upstream ended its side: a status other than OK is an error.
            try:
                raise_status(self._call)
            except GRPCError as exc:
                raise TransportError(_describe(exc)) from None
            raise StreamEnded("the peer ended the stream")
        return msg if isinstance(msg, pb.Batch) else None

    def _status(self, exc: BaseException) -> str:
        # A stream reset or a closed connection often carries the real status
        # in the trailers that came before it.
        try:
            raise_status(self._call)
        except GRPCError as status:
            return _describe(status)
        except Exception:  # best effort: the original error is reported below
            pass
        return _describe(exc)

    async def done_writing(self) -> None:
        try:
            await self._call.end()
        except _BROKEN as exc:
            raise TransportError(_describe(exc)) from None

    def cancel(self) -> None:
        """Close the connection: a pending read fails at once."""
        self._cancelled = True
        self._channel.close()

    def last_data(self) -> float:
        return cast(_Channel, self._channel).last_data()

    def tcp_state(self) -> str:
        return cast(_Channel, self._channel).tcp_state()

    async def close(self) -> None:
        self._cancelled = True
        if self._started is not None and not self._started.done():
            self._started.cancel()
        self._channel.close()


def open_client(addr: str, *, tls: ClientTLS | None, metadata: Mapping[str, str]) -> _Client:
    host, port = parse_hostport(addr)
    channel = _Channel(
        host,
        port,
        ssl=client_ssl_context(tls) if tls is not None else None,
        codec=_Codec(),
        config=CLIENT_CONFIG,
    )
    call = channel.request(
        wire.BRIDGE_METHOD,
        Cardinality.STREAM_STREAM,
        pb.Batch,
        pb.Batch,
        metadata=dict(metadata) or None,
    )
    return _Client(channel, call)


class _ServerStream:
    __slots__ = ("_call", "metadata", "peer")

    def __init__(self, call: ServerCall[pb.Batch, pb.Batch]) -> None:
        self._call = call
        self.metadata = {k: v for k, v in (call.metadata or {}).items() if isinstance(v, str)}
        peer = call.peer.addr()
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    async def read(self) -> pb.Batch | None:
        msg = await self._call.recv_message()
        if msg is None:
            raise StreamEnded("the peer ended the stream")
        return msg if isinstance(msg, pb.Batch) else None

    async def write(self, batch: pb.Batch) -> None:
        await self._call.send_message(batch)


class _Bridge:
    def __init__(self, bridge: BridgeHandler) -> None:
        self._bridge = bridge
        self.running: set[asyncio.Task[Any]] = set()  # for a graceful stop

    def __mapping__(self) -> dict[str, Handler]:
        return {
            wire.BRIDGE_METHOD: Handler(self._handle, Cardinality.STREAM_STREAM, pb.Batch, pb.Batch)
        }

    async def _handle(self, call: ServerCall[pb.Batch, pb.Batch]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        try:
            await self._bridge(_ServerStream(call))
            if task.cancelling():
                # grpclib cancelled this handler (the connection was lost) as it
                # was finishing: show it the cancellation, or it logs an error.
                raise asyncio.CancelledError
        except Refused as exc:
            raise GRPCError(Status[exc.status], exc.details) from None
        except StreamTerminatedError:
            # grpclib's own cancellation when the node's connection is lost: it
            # must propagate, or grpclib logs "Failed to handle cancellation".
            raise
        except _BROKEN as exc:
            log.debug("Bridge stream from %s broke: %s", call.peer.addr(), _describe(exc))


class _Health:
    """grpc.health.v1.Health (Check and Watch), on grpclib with grpc_health's
    messages (grpclib's own copy of them would clash in the protobuf pool)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()

    def set(self, service: str, serving: bool) -> None:
        self._status[service] = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._changed.set()
        self._changed = asyncio.Event()

    def shutdown(self) -> None:
        for service in list(self._status):
            self.set(service, False)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/grpc.health.v1.Health/Check": Handler(
                self._check,
                Cardinality.UNARY_UNARY,
                health_pb2.HealthCheckRequest,
                health_pb2.HealthCheckResponse,
            ),
            "/grpc.health.v1.Health/Watch": Handler(
                self._watch,
                Cardinality.UNARY_STREAM,
                health_pb2.HealthCheckRequest,
                health_pb2.HealthCheckResponse,
            ),
        }

    async def _check(self, call: ServerCall[Any, Any]) -> None:
        request = await call.recv_message()
        assert request is not None
        status = self._status.get(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        await call.send_message(health_pb2.HealthCheckResponse(status=status))

    async def _watch(self, call: ServerCall[Any, Any]) -> None:
        request = await call.recv_message()
        assert request is not None
        async for status in self._statuses(request.service):
            await call.send_message(health_pb2.HealthCheckResponse(status=status))

    async def _statuses(self, service: str) -> AsyncIterator[int]:
        last = -1
        while True:
            changed = self._changed
            status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield status
            await changed.wait()


class Server:
    """A grpclib server with pmlb.v1.Upstream and grpc.health.v1.Health."""

    def __init__(self, bridge: BridgeHandler, *, tls: ServerTLS | None = None) -> None:
        self._health = _Health()
        self._bridge = _Bridge(bridge)
        self._ssl = server_ssl_context(tls) if tls is not None else None
        self._server = _GServer([self._bridge, self._health], codec=_Codec(), config=SERVER_CONFIG)
        self._listener: asyncio.Server | None = None

    async def start(self, listen: str) -> int:
        host, port = parse_hostport(listen)
        await self._server.start(host, port, ssl=self._ssl, reuse_address=True)
        # grpclib keeps the asyncio server (created by loop.create_server) here.
        self._listener = cast("asyncio.Server | None", self._server._server)
        sockets = self._listener.sockets if self._listener is not None else ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def set_health(self, service: str, serving: bool) -> None:
        self._health.set(service, serving)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, stop accepting, let streams end for ``grace`` seconds,
        then cancel the rest (what grpc.aio's ``stop(grace)`` does)."""
        if self._listener is None:
            return
        self._health.shutdown()
        self._listener.close()
        if self._bridge.running:
            await asyncio.wait(set(self._bridge.running), timeout=grace)
        self._server.close()
        await self._server.wait_closed()

    async def wait(self) -> None:
        if self._listener is not None:
            await self._server.wait_closed()
