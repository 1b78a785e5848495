"""The node's control API (``pmlb.v1.Node``): send to, close, describe and list
the marks this node holds, from any internal service.

Served on ``--control``; the address is registered in etcd with the node, so a
client finds it from the mark's node id (see pmlb.client). A mark that is not
open here answers NOT_FOUND, like API Gateway's GoneException.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Final

import grpc

from pmlb import reasons
from pmlb._proto.pmlb.v1 import node_pb2 as npb
from pmlb._proto.pmlb.v1 import node_pb2_grpc
from pmlb.errors import InvalidMark
from pmlb.ids import parse_mark

if TYPE_CHECKING:
    from pmlb.dataplane.conn import ClientConn
    from pmlb.dataplane.plane import DataPlane

log = logging.getLogger("pmlb.control")

MAX_PAGE: Final = 1000
MAX_SEND_PAYLOADS: Final = 1000


def mark_info(conn: ClientConn) -> npb.MarkInfo:
    d = conn.describe()
    return npb.MarkInfo(
        mark=conn.mark,
        service=conn.plane.config.service,
        client_addr=d["client_addr"],
        client_port=d["client_port"],
        upstream=d["upstream"],
        metadata=d["metadata"],
        accepted_at_unix_ms=d["accepted_at_unix_ms"],
        bytes_in=d["bytes_in"],
        bytes_out=d["bytes_out"],
        frames_in=d["frames_in"],
        frames_out=d["frames_out"],
        binds=d["binds"],
    )


class NodeControl(node_pb2_grpc.NodeServicer):
    def __init__(self, plane: DataPlane, token: str | None = None) -> None:
        self.plane = plane
        self.calls = 0
        self.denied = 0
        self._token = f"Bearer {token}".encode() if token else None

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if self._token is None:
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        given = sent.encode() if isinstance(sent, str) else bytes(sent)
        if not hmac.compare_digest(given, self._token):  # constant time
            self.denied += 1
            log.warning("control API call from %s refused: bad or missing token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    async def _conn(self, mark: str, context: grpc.aio.ServicerContext) -> ClientConn:  # type: ignore[type-arg]
        await self._authorize(context)
        self.calls += 1
        conn = self.plane.marks.get(mark)
        if conn is None or conn.state >= 4:  # CLOSING or CLOSED
            try:
                owner = parse_mark(mark).node_id
                where = "" if owner == self.plane.config.node_id else f" (it belongs to {owner})"
            except InvalidMark:
                where = " (not a mark)"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"mark {mark} is not open here{where}")
        assert conn is not None
        return conn

    async def Send(
        self,
        request: npb.SendRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.SendResponse:
        conn = await self._conn(request.mark, context)
        if len(request.payloads) > MAX_SEND_PAYLOADS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_SEND_PAYLOADS} payloads per call"
            )
        for payload in request.payloads:
            if len(payload) > self.plane.max_frame:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"payload over the maximum frame size {self.plane.max_frame}",
                )
            conn.deliver(payload, 0, None)
        return npb.SendResponse()

    async def Close(
        self,
        request: npb.CloseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.CloseResponse:
        conn = await self._conn(request.mark, context)
        reason = reasons.clean(request.reason) or reasons.CLOSED_BY_API
        log.info(
            "mark=%s closed through the control API (reason=%s)",
            conn.mark,
            reasons.for_log(reason),
        )
        conn.close(reason, "closed through the control API")
        return npb.CloseResponse()

    async def Describe(
        self,
        request: npb.DescribeRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.MarkInfo:
        return mark_info(await self._conn(request.mark, context))

    async def List(
        self,
        request: npb.ListRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.ListResponse:
        await self._authorize(context)
        size = min(request.page_size or 100, MAX_PAGE)
        marks = self.plane.marks
        # Marks are held in accept order; the token is the last mark returned.
        keys = list(marks)
        start = 0
        if request.page_token:
            try:
                start = keys.index(request.page_token) + 1
            except ValueError:
                # That mark closed meanwhile: resume after it by its counter.
                try:
                    last = parse_mark(request.page_token).counter
                except InvalidMark:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
                start = next(
                    (i for i, k in enumerate(keys) if parse_mark(k).counter > last), len(keys)
                )
        out = npb.ListResponse()
        i = start
        while i < len(keys) and len(out.marks) < size:
            conn = marks.get(keys[i])
            if conn is not None and (
                not request.upstream
                or (conn.route is not None and conn.route.id == request.upstream)
            ):
                out.marks.append(mark_info(conn))
            i += 1
        if i < len(keys) and out.marks:
            out.next_page_token = out.marks[-1].mark
        return out


async def start_control(
    plane: DataPlane,
    host: str,
    port: int,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The control API; over TLS (mTLS with a client CA) when ``credentials``."""
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServicer_to_server(NodeControl(plane, token), server)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for the control API")
    await server.start()
    log.info("control API (pmlb.v1.Node) on %s:%d%s", host, bound, " (TLS)" if credentials else "")
    return server, bound
