"""Reach any mark from any process: ``MarkClient``.

A mark names its node; the node's control address is in etcd under
``<prefix>/nodes/<node id>``. MarkClient looks it up (cached, refreshed when a
call fails to connect), then calls ``pmlb.v1.Node`` there::

    async with MarkClient(["http://127.0.0.1:2379"]) as marks:
        await marks.send(mark, b"hello")
        info = await marks.describe(mark)
        await marks.close(mark)

A mark that is not open (any more) raises MarkGone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from pmlb._proto.pmlb.v1 import node_pb2 as npb
from pmlb._proto.pmlb.v1 import node_pb2_grpc
from pmlb.config import etcd_values_from_env
from pmlb.errors import MarkGone, PmlbError
from pmlb.protocol.ids import node_of
from pmlb.store.etcd import EtcdSettings, EtcdStore, StoreError, settings_from
from pmlb.store.keys import InvalidValue, Keys, parse_node
from pmlb.tlsconf import upstream_channel_credentials

CALL_TIMEOUT = 5.0


class MarkClient:
    def __init__(
        self,
        etcd: Sequence[str] = (),
        prefix: str | None = None,
        token: str | None = None,
        settings: EtcdSettings | None = None,
        control_ca: str | None = None,
        control_cert: str | None = None,
        control_key: str | None = None,
    ) -> None:
        """Reach marks through etcd and the nodes' control APIs.

        ``etcd``/``prefix`` default to ``PMLB_ETCD``/``PMLB_ETCD_PREFIX``, and TLS,
        user and password come from the same ``PMLB_ETCD_*`` variables as every
        pmlb command; ``settings`` overrides all of it. ``token``: the nodes'
        --control-token (default: PMLB_CONTROL_TOKEN)."""
        values = etcd_values_from_env()
        if settings is None:
            if etcd:
                values["etcd"] = list(etcd)
            settings = settings_from(values)
        self.store = EtcdStore(settings)
        prefix = prefix if prefix is not None else str(values["etcd_prefix"])
        token = token if token is not None else os.environ.get("PMLB_CONTROL_TOKEN")
        # TLS to the nodes' control APIs (their --control-cert): verify with
        # this CA, and show this client certificate when they require one.
        env = os.environ.get
        control_ca = control_ca or env("PMLB_CONTROL_CA")
        control_cert = control_cert or env("PMLB_CONTROL_CLIENT_CERT")
        control_key = control_key or env("PMLB_CONTROL_CLIENT_KEY")
        self._tls = upstream_channel_credentials(control_ca, control_cert, control_key)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.keys = Keys(prefix)
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeStub]] = {}
        self._connected = False

    async def __aenter__(self) -> MarkClient:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close_all()

    async def connect(self) -> None:
        if not self._connected:
            await self.store.connect()
            self._connected = True

    async def close_all(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close(grace=None)
        self._stubs.clear()
        await self.store.close()

    async def _stub(self, mark: str) -> node_pb2_grpc.NodeStub:
        node_id = node_of(mark)
        cached = self._stubs.get(node_id)
        if cached is not None:
            return cached[1]
        await self.connect()
        try:
            kv = await self.store.get(self.keys.node(node_id))
        except StoreError as exc:
            raise PmlbError(f"cannot look up node {node_id}: {exc}") from None
        if kv is None:
            raise MarkGone(f"mark {mark}: node {node_id} is not registered (gone or draining)")
        if kv.lease == 0:
            # Nodes register under their session's lease; a key without one is
            # not a live node, and the control token must not go to whatever
            # address it names.
            raise PmlbError(f"node {node_id}: its key has no lease, so it is not a live node")
        try:
            control = str(parse_node(node_id, kv.value).get("control", ""))
        except InvalidValue:
            control = ""
        if not control:
            raise PmlbError(f"node {node_id} serves no control API (start it with --control)")
        channel = (
            grpc.aio.secure_channel(control, self._tls)
            if self._tls is not None
            else grpc.aio.insecure_channel(control)
        )
        stub = node_pb2_grpc.NodeStub(channel)
        self._stubs[node_id] = (channel, stub)
        return stub

    async def _call(self, mark: str, method: str, request: Any) -> Any:
        stub = await self._stub(mark)
        try:
            return await getattr(stub, method)(
                request, timeout=CALL_TIMEOUT, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise MarkGone(exc.details() or f"mark {mark} is gone") from None
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise PmlbError(f"{method} {mark}: the node refused our control token") from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._stubs.pop(node_of(mark), None)  # look the node up again next time
            raise PmlbError(f"{method} {mark}: {exc.code().name}: {exc.details()}") from None

    async def send(self, mark: str, *payloads: bytes) -> None:
        await self._call(mark, "Send", npb.SendRequest(mark=mark, payloads=list(payloads)))

    async def close(self, mark: str, reason: str = "") -> None:
        await self._call(mark, "Close", npb.CloseRequest(mark=mark, reason=reason))

    async def describe(self, mark: str) -> npb.MarkInfo:
        info: npb.MarkInfo = await self._call(mark, "Describe", npb.DescribeRequest(mark=mark))
        return info
