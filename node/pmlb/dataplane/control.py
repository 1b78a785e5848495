"""The node's control API (``pmlb.v1.Node``): send to, close, describe and list
the marks this node holds, from any internal service.

Served on ``--control``; the address is registered in etcd with the node, so a
client finds it from the mark's node id (see pmlb.client). A mark that is not
open here answers NOT_FOUND, like API Gateway's GoneException.

In a node of several workers every worker serves the one control address
(SO_REUSEPORT, gRPC's default), and a call for a mark another worker holds is
handed to it (pmlb.dataplane.siblings); List pages through every worker. Each
worker also serves its own marks alone on an internal Unix socket, which is
what its siblings call.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from pmlb._proto.pmlb.v1 import node_pb2 as npb
from pmlb._proto.pmlb.v1 import node_pb2_grpc
from pmlb.dataplane.siblings import Siblings
from pmlb.errors import InvalidMark
from pmlb.protocol import reasons
from pmlb.protocol.ids import parse_mark, worker_of

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
    def __init__(
        self, plane: DataPlane, token: str | None = None, siblings: Siblings | None = None
    ) -> None:
        self.plane = plane
        self.siblings = siblings
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

    async def _sibling(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        """The answer of the worker holding ``request.mark``, when a sibling does
        (None: handle it here)."""
        await self._authorize(context)
        if self.siblings is None or request.mark in self.plane.marks:
            return None
        worker = self.siblings.owner(request.mark)
        if worker is None:
            return None
        self.calls += 1
        try:
            return await self.siblings.call(worker, method, request)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

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
        answer = await self._sibling("Send", request, context)
        if answer is not None:
            return cast(npb.SendResponse, answer)
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
        answer = await self._sibling("Close", request, context)
        if answer is not None:
            return cast(npb.CloseResponse, answer)
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
        answer = await self._sibling("Describe", request, context)
        if answer is not None:
            return cast(npb.MarkInfo, answer)
        return mark_info(await self._conn(request.mark, context))

    async def List(
        self,
        request: npb.ListRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.ListResponse:
        await self._authorize(context)
        if self.siblings is not None:
            return await self._list_node(request, context)
        return await self._list_here(request, context)

    async def _list_node(
        self,
        request: npb.ListRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.ListResponse:
        """Every worker's marks, worker by worker; the token's mark names the
        worker to go on with."""
        siblings = self.siblings
        assert siblings is not None
        size = min(request.page_size or 100, MAX_PAGE)
        first = worker_of(request.page_token) if request.page_token else 0
        out = npb.ListResponse()
        more = False
        for worker in range(first or 0, siblings.count):
            left = size - len(out.marks)
            if left <= 0:
                more = True
                break
            part = npb.ListRequest(
                page_size=left,
                page_token=request.page_token if worker == first else "",
                upstream=request.upstream,
            )
            if worker == siblings.index:
                got = await self._list_here(part, context)
            else:
                try:
                    got = await siblings.call(worker, "List", part)
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), f"worker {worker}: {exc.details()}")
            out.marks.extend(got.marks)
            if got.next_page_token:
                more = True
                break
        if more and out.marks:
            out.next_page_token = out.marks[-1].mark
        return out

    async def _list_here(
        self,
        request: npb.ListRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> npb.ListResponse:
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
    siblings: Siblings | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The control API; over TLS (mTLS with a client CA) when ``credentials``.
    ``host`` ``unix:PATH`` serves a Unix socket (a worker's internal one)."""
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServicer_to_server(NodeControl(plane, token, siblings), server)
    if host.startswith("unix:"):
        if not server.add_insecure_port(host):
            raise OSError(f"cannot listen on {host} for the control API")
        await server.start()
        return server, 0
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
