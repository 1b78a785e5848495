"""What every transport shares: the stream interfaces, errors, TLS files and
keepalive settings. Transports (``h2lib``, ``cgrpc``) import these from here;
users import them from ``pmlb.transport``."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import ConfigError, PmlbError

# Re-exported: transports raise it at a clean end of a stream.
from pmlb.protocol.wire import StreamEnded as StreamEnded  # noqa: PLC0414 (re-exported)

TRANSPORTS: Final = ("grpclib", "grpcio", "nghttp2")
DEFAULT_TRANSPORT: Final = "nghttp2"

# HTTP/2 keepalive on links: a peer that vanished without a FIN (power loss, a
# cut cable) is noticed within KEEPALIVE_TIME + KEEPALIVE_TIMEOUT even when no
# mark is bound; pmlb's own pings (--ack-timeout) cover hung peers with marks.
KEEPALIVE_TIME: Final = 10.0
KEEPALIVE_TIMEOUT: Final = 5.0
# HTTP/2 frames links accept, advertised in SETTINGS_MAX_FRAME_SIZE (the
# protocol default is 16 KiB). A Batch of up to 1 MiB then crosses as one or
# two DATA frames instead of 64: in pure-Python h2 each frame costs a parse, a
# buffer round trip and a WINDOW_UPDATE written back, which dominated the bulk
# rows of `make bench`. Peers that keep 16 KiB (grpc.aio) are sent 16 KiB frames.
MAX_FRAME_SIZE: Final = 2 << 20
# The HTTP/2 receive window of a link, per stream and per connection (what
# grpclib uses by default): what a peer may send before the reader takes it.
WINDOW_SIZE: Final = 4 << 20
# The grpc.health.v1 service name the checker asks about (proto/README.md,
# "Health"); upstreams answer for it and for "".
HEALTH_SERVICE: Final = "pmlb.v1.Upstream"


class TransportError(PmlbError):
    """The stream failed: a gRPC status from the peer, or the connection broke."""


class ClientStream(Protocol):
    """The node's end of one Bridge stream (one link session)."""

    async def write(self, batch: pb.Batch) -> None:
        """Send one Batch; raises TransportError when the stream is broken."""

    async def read(self) -> pb.Batch | None:
        """The next Batch, or None for a message that is not a Batch.

        Raises StreamEnded at a clean end, TransportError on failure.
        """

    async def done_writing(self) -> None:
        """Half-close: no more Batches from this side."""

    def cancel(self) -> None:
        """Abort the stream now; a pending or later read raises TransportError."""

    def last_data(self) -> float:
        """When the link last showed life below whole messages
        (time.monotonic()): a call that found enough bytes received, or
        acknowledged by the peer, since the previous call. Called once per
        watchdog period. 0.0 when the transport cannot tell (grpcio).

        A slow link carries a large Batch over seconds: the link's hung-peer
        watchdog counts this as life, not only whole messages."""

    async def close(self) -> None:
        """Release the connection (after cancel or the end of the stream)."""


class ServerStream(Protocol):
    """The upstream's end of one Bridge stream."""

    @property
    def metadata(self) -> Mapping[str, str]:
        """Request metadata (lower-case keys)."""

    @property
    def peer(self) -> str:
        """The node's address, for logs."""

    async def read(self) -> pb.Batch | None:
        """As ClientStream.read."""

    async def write(self, batch: pb.Batch) -> None:
        """Send one Batch."""


BridgeHandler = Callable[[ServerStream], Awaitable[None]]


class Refused(PmlbError):
    """Raised by a Bridge handler to end the stream with a gRPC status.

    ``status`` is the status name (e.g. ``"UNAUTHENTICATED"``).
    """

    def __init__(self, status: str, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


@dataclass(frozen=True)
class ClientTLS:
    """Files for TLS on links (mTLS when cert and key are given)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ServerTLS:
    """Files for an upstream's TLS; with ``client_ca`` it demands client certificates."""

    cert: str
    key: str
    client_ca: str | None = None


def check_transport(name: str) -> str:
    if name not in TRANSPORTS:
        raise ConfigError(f"unknown link transport {name!r}: choose one of {', '.join(TRANSPORTS)}")
    return name


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext:
    """An SSLContext for a link, speaking h2 (gRPC over TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    ctx.set_alpn_protocols(["h2"])
    if tls.cert:
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {tls.cert}: {exc}") from None
    return ctx


def server_ssl_context(tls: ServerTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=tls.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material {tls.cert}: {exc}") from None
    return ctx
