"""Bridge streams on grpc.aio (grpcio, the C core): ``--link-transport grpcio``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import grpc

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import ConfigError
from pmlb.protocol import wire
from pmlb.transport.base import (
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    BridgeHandler,
    ClientTLS,
    Refused,
    ServerTLS,
    StreamEnded,
    TransportError,
)

log = logging.getLogger("pmlb.transport")

CHANNEL_OPTIONS: Final = (
    ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", wire.GRPC_MAX_MESSAGE),
    ("grpc.max_send_message_length", wire.GRPC_MAX_MESSAGE),
    ("grpc.enable_retries", 0),
    # One channel per link, never shared with another Link to the same address.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
SERVER_OPTIONS: Final = (
    ("grpc.max_receive_message_length", wire.GRPC_MAX_MESSAGE),
    ("grpc.max_send_message_length", wire.GRPC_MAX_MESSAGE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
)
# grpc.aio's end-of-stream sentinel (missing from the grpc-stubs package).
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    cert, key = _read(tls.cert), _read(tls.key)
    assert cert is not None
    assert key is not None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(tls.client_ca),
        require_client_auth=tls.client_ca is not None,
    )


class _Client:
    __slots__ = ("_call", "_cancelled", "_channel")

    def __init__(self, channel: grpc.aio.Channel, metadata: Mapping[str, str]) -> None:
        self._channel = channel
        self._cancelled = False
        self._call: Any = channel.stream_stream(
            wire.BRIDGE_METHOD,
            request_serializer=wire.serialize_batch,
            response_deserializer=wire.parse_batch_lenient,
        )(metadata=tuple(metadata.items()) or None)  # type: ignore[call-arg]

    async def write(self, batch: pb.Batch) -> None:
        try:
            await self._call.write(batch)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(f"{exc.code().name}: {exc.details()}") from None
        except asyncio.InvalidStateError:
            raise TransportError("the stream is closed") from None

    async def read(self) -> pb.Batch | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise TransportError(f"{exc.code().name}: {exc.details()}") from None
        except asyncio.CancelledError:
            # A cancelled call raises CancelledError in its reader; that is
            # our cancel() unless this task itself is being cancelled.
            task = asyncio.current_task()
            if self._cancelled and task is not None and not task.cancelling():
                raise TransportError("cancelled") from None
            raise
        if msg is _EOF:
            raise StreamEnded("the peer ended the stream")
        return msg if isinstance(msg, pb.Batch) else None

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def last_data(self) -> float:
        return 0.0  # grpc.aio shows whole messages only

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close(grace=None)


def open_client(addr: str, *, tls: ClientTLS | None, metadata: Mapping[str, str]) -> _Client:
    channel = (
        grpc.aio.secure_channel(addr, channel_credentials(tls), options=CHANNEL_OPTIONS)
        if tls is not None
        else grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
    )
    return _Client(channel, metadata)


class _ServerStream:
    __slots__ = ("_context", "metadata", "peer")

    def __init__(self, context: grpc.aio.ServicerContext[pb.Batch, pb.Batch]) -> None:
        self._context = context
        self.metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        self.peer = context.peer()

    async def read(self) -> pb.Batch | None:
        msg = await self._context.read()
        if msg is _EOF:
            raise StreamEnded("the peer ended the stream")
        return msg if isinstance(msg, pb.Batch) else None

    async def write(self, batch: pb.Batch) -> None:
        await self._context.write(batch)


def bridge_method_handlers(bridge: BridgeHandler) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The pmlb.v1.Upstream service on a grpc.aio server, calling ``bridge``."""

    async def handle(
        request_iterator: object, context: grpc.aio.ServicerContext[pb.Batch, pb.Batch]
    ) -> None:
        try:
            await bridge(_ServerStream(context))
        except Refused as exc:
            await context.abort(getattr(grpc.StatusCode, exc.status), exc.details)

    handler = grpc.stream_stream_rpc_method_handler(
        handle,
        request_deserializer=wire.parse_batch_lenient,
        response_serializer=wire.serialize_batch,
    )
    service, method = wire.BRIDGE_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: handler})


class Server:
    """A grpc.aio server with pmlb.v1.Upstream and grpc.health.v1.Health."""

    def __init__(
        self,
        bridge: BridgeHandler,
        *,
        tls: ServerTLS | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        from grpc_health.v1 import health

        self._bridge = bridge
        self._credentials = credentials or (server_credentials(tls) if tls else None)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None

    async def start(self, listen: str) -> int:
        from grpc_health.v1 import health_pb2_grpc

        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((bridge_method_handlers(self._bridge),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = (
            server.add_secure_port(listen, self._credentials)
            if self._credentials is not None
            else server.add_insecure_port(listen)
        )
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        self._server = server
        return port

    async def set_health(self, service: str, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(service, status)

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def check_health(channel: grpc.aio.Channel, service: str, timeout: float) -> tuple[bool, str]:
    """One grpc.health.v1 Check: (serving, status name or error), as the
    checker sees it; ``pmlb conformance`` asks the same way."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"[:200]
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    return ok, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
