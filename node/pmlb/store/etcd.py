"""etcd v3 behind a small asyncio interface: the only code that talks to etcd.

It uses the etcd v3 gRPC API directly (the generated stubs shipped by the
`etcd3aio` package) on one grpc.aio channel, so that every call has the same
shape: a per-attempt timeout, retries with jittered exponential backoff, and
an overall deadline (``aio.Backoff``). Watches are raw streams that report
compaction and cancellation as WatchReset, so callers list again (a fresh
etcd has lower revisions; resuming from an old one would silently wait).

Several endpoints are tried round-robin; TLS and user/password are supported.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import grpc
from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2 as rpc
from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2_grpc as rpc_grpc
from etcd3aio.proto.etcd.api.mvccpb import kv_pb2

from pmlb.aio import Backoff
from pmlb.errors import ConfigError
from pmlb.store.base import KV, Event, StoreError, WatchReset

__all__ = [
    "KV",
    "EtcdSettings",
    "EtcdStore",
    "Event",
    "StoreError",
    "WatchReset",
    "node_settings",
    "prefix_end",
    "settings_from",
]

if TYPE_CHECKING:
    from pmlb.config import NodeConfig

log = logging.getLogger("pmlb.store")
T = TypeVar("T")

# Retrying a transient failure of one call, within the call's deadline.
CALL_RETRY: Final = (0.05, 1.0)
_TRANSIENT: Final = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    call_timeout: float = 2.0
    deadline: float = 6.0


def prefix_end(prefix: str) -> bytes:
    """The exclusive end of the key range that starts with ``prefix``."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\x00"


def _decode_key(raw: bytes) -> str:
    # Keys are ours or typed by operators; a non-UTF-8 key must not crash us.
    return raw.decode("utf-8", errors="replace")


class EtcdStore:
    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._kv: rpc_grpc.KVStub | None = None
        self._lease: rpc_grpc.LeaseStub | None = None
        self._watch: rpc_grpc.WatchStub | None = None
        self._auth: rpc_grpc.AuthStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self.connected = asyncio.Event()

    # -- connection ------------------------------------------------------------

    def _target(self) -> tuple[str, bool]:
        """One gRPC target over every endpoint: hostnames are resolved here (all
        their addresses), IPv6 literals accepted, and the channel balances
        over all members (round_robin), so a dead member is skipped."""
        v4: list[str] = []
        v6: list[str] = []
        secure = False
        for ep in self.settings.endpoints:
            url = urlsplit(ep if "://" in ep else f"http://{ep}")
            try:
                port = url.port
            except ValueError:
                port = None
            if url.scheme not in ("http", "https") or not url.hostname or not port:
                raise ConfigError(f"--etcd: bad endpoint {ep!r} (use http://HOST:PORT)")
            secure = secure or url.scheme == "https"
            try:
                infos = socket.getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                log.warning("etcd endpoint %s does not resolve (%s); skipped", ep, exc)
                continue
            for family, _, _, _, addr in infos:
                if family == socket.AF_INET6:
                    v6.append(f"[{addr[0]}]:{port}")
                else:
                    v4.append(f"{addr[0]}:{port}")
        v4, v6 = list(dict.fromkeys(v4)), list(dict.fromkeys(v6))
        if not v4 and not v6:
            raise ConfigError(
                f"--etcd: no endpoint resolves ({', '.join(self.settings.endpoints)})"
            )
        # A gRPC target holds one address family; IPv4 wins when both appear.
        if v4 and v6:
            log.info("etcd: using the IPv4 addresses %s (IPv6 %s left out)", v4, v6)
        target = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
        log.debug("etcd target %s", target)
        return target, secure

    async def connect(self) -> None:
        target, secure = self._target()
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 5_000),
            ("grpc.keepalive_timeout_ms", 3_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        s = self.settings
        if secure or s.ca_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(s.ca_file),
                private_key=_read(s.key_file),
                certificate_chain=_read(s.cert_file),
            )
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._kv = rpc_grpc.KVStub(self._channel)
        self._lease = rpc_grpc.LeaseStub(self._channel)
        self._watch = rpc_grpc.WatchStub(self._channel)
        self._auth = rpc_grpc.AuthStub(self._channel)
        if s.user:
            await self._authenticate()

    async def _authenticate(self) -> None:
        assert self._auth is not None
        resp = await self._call(
            lambda: self._auth.Authenticate(  # type: ignore[union-attr]
                rpc.AuthenticateRequest(name=self.settings.user, password=self.settings.password),
                timeout=self.settings.call_timeout,
            ),
            authenticate=False,
        )
        self._metadata = (("token", resp.token),)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    # -- the retry policy every call goes through --------------------------------

    async def _retry(self, fn: Callable[[], Awaitable[T]], limit: float) -> T:
        """``fn()`` until it answers or fails for good: a transient gRPC
        error is tried again after ``aio.Backoff`` (50 ms doubling to 1 s)
        while ``limit`` seconds have not passed; the last error is raised."""
        backoff = Backoff(*CALL_RETRY)
        give_up = time.monotonic() + limit
        while True:
            try:
                result = await fn()
            except grpc.aio.AioRpcError as exc:
                delay = backoff.next()
                if exc.code() not in _TRANSIENT or time.monotonic() + delay >= give_up:
                    raise
                await asyncio.sleep(delay)
                continue
            self.connected.set()
            return result

    async def _call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        authenticate: bool = True,
        deadline: float | None = None,
    ) -> T:
        limit = self.settings.deadline if deadline is None else deadline
        try:
            return await self._retry(fn, limit)
        except grpc.aio.AioRpcError as exc:
            if (
                exc.code() == grpc.StatusCode.UNAUTHENTICATED
                and authenticate
                and self.settings.user
            ):
                await self._authenticate()  # the token expired: once more with a new one
                return await self._call(fn, authenticate=False, deadline=deadline)
            if exc.code() in _TRANSIENT:
                self.connected.clear()
                # What an operator can act on: which etcd, how long we tried,
                # and the usual cause (no quorum, or no route to the members).
                raise StoreError(
                    f"etcd at {', '.join(self.settings.endpoints)} did not answer within "
                    f"{limit:g}s ({exc.code().name}): are a majority of its members up "
                    "and reachable from here?"
                ) from None
            raise StoreError(f"etcd: {exc.code().name}: {exc.details()}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _kw(self) -> dict[str, Any]:
        return {"timeout": self.settings.call_timeout, "metadata": self._metadata or None}

    # -- key/value ----------------------------------------------------------------

    async def get_prefix(self, prefix: str) -> tuple[int, list[KV]]:
        """Every key under ``prefix`` and the revision they were read at."""
        assert self._kv is not None
        req = rpc.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix))
        resp = await self._call(lambda: self._kv.Range(req, **self._kw()))  # type: ignore[union-attr]
        kvs = [KV(_decode_key(kv.key), kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs]
        return resp.header.revision, kvs

    async def get(self, key: str) -> KV | None:
        assert self._kv is not None
        req = rpc.RangeRequest(key=key.encode())
        resp = await self._call(lambda: self._kv.Range(req, **self._kw()))  # type: ignore[union-attr]
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(_decode_key(kv.key), kv.value, kv.mod_revision, kv.lease)

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        assert self._kv is not None
        data = value.encode() if isinstance(value, str) else value
        req = rpc.PutRequest(key=key.encode(), value=data, lease=lease)
        resp = await self._call(lambda: self._kv.Put(req, **self._kw()))  # type: ignore[union-attr]
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        assert self._kv is not None
        req = rpc.DeleteRangeRequest(key=key.encode())
        resp = await self._call(lambda: self._kv.DeleteRange(req, **self._kw()))  # type: ignore[union-attr]
        return int(resp.deleted)

    async def put_if_absent(self, key: str, value: str, lease: int) -> bool:
        """Create ``key`` only if it does not exist (an election campaign)."""
        assert self._kv is not None
        req = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=key.encode(),
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=0,
                )
            ],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(key=key.encode(), value=value.encode(), lease=lease)
                )
            ],
        )
        resp = await self._call(lambda: self._kv.Txn(req, **self._kw()))  # type: ignore[union-attr]
        return bool(resp.succeeded)

    async def delete_if_value(self, key: str, value: str, deadline: float | None = None) -> bool:
        """Delete ``key`` only while it still holds ``value`` (resigning)."""
        assert self._kv is not None
        req = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=key.encode(),
                    target=rpc.Compare.VALUE,
                    result=rpc.Compare.EQUAL,
                    value=value.encode(),
                )
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))],
        )
        resp = await self._call(
            lambda: self._kv.Txn(req, **self._kw()),  # type: ignore[union-attr]
            deadline=deadline,
        )
        return bool(resp.succeeded)

    # -- leases -------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        assert self._lease is not None
        req = rpc.LeaseGrantRequest(TTL=ttl)
        resp = await self._call(lambda: self._lease.LeaseGrant(req, **self._kw()))  # type: ignore[union-attr]
        return int(resp.ID)

    async def revoke(self, lease: int) -> bool:
        assert self._lease is not None
        req = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._call(
                lambda: self._lease.LeaseRevoke(req, **self._kw()),  # type: ignore[union-attr]
                deadline=1.5,  # shutdown must not hang on a dead etcd
            )
        except StoreError as exc:
            log.warning("could not revoke lease %x: %s (it expires by its TTL)", lease, exc)
            return False
        return True

    async def keepalive_once(self, lease: int) -> int:
        """Refresh ``lease``; return its remaining TTL, 0 when etcd no longer has it."""
        assert self._lease is not None

        async def once() -> int:
            call = self._lease.LeaseKeepAlive(  # type: ignore[union-attr]
                iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                timeout=self.settings.call_timeout,
                metadata=self._metadata or None,
            )
            async for resp in call:
                return int(resp.TTL)
            return 0

        return await self._call(once)

    # -- watch -------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Events under ``prefix`` from ``start_revision`` on, a list per response.

        Raises WatchReset when the caller must list again, StoreError when the
        stream broke (the caller lists again after a backoff either way).
        """
        assert self._watch is not None
        create = rpc.WatchCreateRequest(
            key=prefix.encode(),
            range_end=prefix_end(prefix),
            start_revision=start_revision,
            progress_notify=True,
        )

        async def requests() -> AsyncIterator[rpc.WatchRequest]:
            yield rpc.WatchRequest(create_request=create)
            await asyncio.Event().wait()  # keep the request side open

        call = self._watch.Watch(requests(), metadata=self._metadata or None)
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise WatchReset(
                        f"revision {start_revision} compacted (now {resp.compact_revision})"
                    )
                if resp.canceled:
                    raise WatchReset(f"watch cancelled: {resp.cancel_reason or 'no reason'}")
                if resp.created and resp.header.revision + 1 < start_revision:
                    # The cluster is younger than our revision: it was replaced.
                    raise WatchReset(
                        f"etcd revision {resp.header.revision} is behind "
                        f"{start_revision}: a new cluster"
                    )
                self.connected.set()
                if resp.events:
                    yield [
                        Event(
                            "put" if ev.type == kv_pb2.Event.PUT else "delete",
                            _decode_key(ev.kv.key),
                            ev.kv.value,
                            ev.kv.lease,
                        )
                        for ev in resp.events
                    ]
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT:
                self.connected.clear()
            raise StoreError(f"etcd watch: {exc.code().name}: {exc.details()}") from None
        finally:
            call.cancel()
        raise StoreError("etcd watch stream ended")


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def node_settings(config: NodeConfig) -> EtcdSettings:
    """EtcdSettings of a node (the node itself, or its supervisor)."""
    return EtcdSettings(
        endpoints=config.etcd,
        user=config.etcd_user,
        password=config.etcd_password,
        ca_file=config.etcd_ca,
        cert_file=config.etcd_cert,
        key_file=config.etcd_key,
    )


def settings_from(values: Mapping[str, Any]) -> EtcdSettings:
    """EtcdSettings from resolved ETCD_OPTIONS values (flags, PMLB_ETCD*, file)."""
    from pmlb.config import etcd_endpoints

    return EtcdSettings(
        endpoints=etcd_endpoints(values["etcd"]),
        user=values.get("etcd_user"),
        password=values.get("etcd_password"),
        ca_file=values.get("etcd_ca"),
        cert_file=values.get("etcd_cert"),
        key_file=values.get("etcd_key"),
    )
