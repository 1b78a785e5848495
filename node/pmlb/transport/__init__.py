"""The seam between the Bridge protocol and a gRPC implementation.

pmlb's Bridge logic (the node's links in ``dataplane.link``, the SDK's
sessions in ``upstream.sdk``) reads and writes whole ``pmlb.v1.Batch``
messages on one bidirectional stream and needs nothing else from gRPC. This
package gives it that stream from one of three implementations, all real gRPC
over HTTP/2 and interoperable with each other and with any other gRPC stack:

``nghttp2``
    the node's end on libnghttp2 through a Cython module (``ngh2``,
    ``_nghttp2.pyx``): HTTP/2 and gRPC framing in C. The node's default,
    because ``make bench`` measured it cheapest per message and per MB (see
    README, Performance). When the module is not built the node runs grpclib
    and says so (``describe``). An upstream asked for it serves with grpclib.
``grpclib``
    pure-Python gRPC on asyncio and h2. No poller thread: a frame costs one
    event-loop turn. The SDK's default server and the node's fallback.
``grpcio``
    Google's grpc.aio (C core). Still used for what it does well regardless of
    this choice: the health checker, the control API and etcd.

The node picks with ``--link-transport``; the SDK with
``UpstreamServer(transport=...)`` or, by default, ``PMLB_LINK_TRANSPORT``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pmlb.transport.base import (
    DEFAULT_TRANSPORT as DEFAULT_TRANSPORT,
)
from pmlb.transport.base import (
    HEALTH_SERVICE as HEALTH_SERVICE,
)
from pmlb.transport.base import (
    KEEPALIVE_TIME as KEEPALIVE_TIME,
)
from pmlb.transport.base import (
    KEEPALIVE_TIMEOUT as KEEPALIVE_TIMEOUT,
)
from pmlb.transport.base import (
    TRANSPORTS as TRANSPORTS,
)
from pmlb.transport.base import (
    BridgeHandler as BridgeHandler,
)
from pmlb.transport.base import (
    ClientStream as ClientStream,
)
from pmlb.transport.base import (
    ClientTLS as ClientTLS,
)
from pmlb.transport.base import (
    Refused as Refused,
)
from pmlb.transport.base import (
    ServerStream as ServerStream,
)
from pmlb.transport.base import (
    ServerTLS as ServerTLS,
)
from pmlb.transport.base import (
    StreamEnded as StreamEnded,
)
from pmlb.transport.base import (
    TransportError as TransportError,
)
from pmlb.transport.base import (
    check_transport as check_transport,
)
from pmlb.transport.base import (
    client_ssl_context as client_ssl_context,
)
from pmlb.transport.base import (
    server_ssl_context as server_ssl_context,
)


def effective(transport: str) -> str:
    """The node-side implementation ``--link-transport transport`` runs on:
    ``nghttp2`` falls back to ``grpclib`` when its native module is missing."""
    if check_transport(transport) == "nghttp2":
        from pmlb.transport import ngh2

        if not ngh2.available():
            return "grpclib"
    return transport


def describe(transport: str) -> str:
    """One line for the node's start-up log: which links it runs, and why
    not the asked-for ones."""
    used = effective(transport)
    if used == "nghttp2":
        from pmlb.transport import ngh2

        return f"links on nghttp2 (native, libnghttp2 {ngh2.library_version()})"
    if used != transport:
        from pmlb.transport import ngh2

        return (
            f"links on grpclib (pure Python), not nghttp2: {ngh2.why_not()}; "
            "make install builds it (it needs Cython, a C compiler and libnghttp2-dev)"
        )
    return f"links on {used}"


def open_client(
    transport: str,
    addr: str,
    *,
    tls: ClientTLS | None,
    metadata: Mapping[str, str],
) -> ClientStream:
    """Open a Bridge stream to ``addr`` (``host:port``) with ``transport``.

    Connecting happens with the first write; failures surface there or in
    the first read as TransportError.
    """
    transport = effective(transport)  # the node said which at start-up (describe)
    if transport == "nghttp2":
        from pmlb.transport import ngh2

        return ngh2.open_client(addr, tls=tls, metadata=metadata)
    if transport == "grpclib":
        from pmlb.transport import h2lib

        return h2lib.open_client(addr, tls=tls, metadata=metadata)
    from pmlb.transport import cgrpc

    return cgrpc.open_client(addr, tls=tls, metadata=metadata)
