"""The checker's write decision across terms (the election's logic over the
in-process store, pmlb.store.memory; the real-etcd behaviour is in
test_etcd_cluster)."""

from __future__ import annotations

import asyncio

import grpc

from pmlb.cluster.checker import Checker, CheckSettings, _Probe
from pmlb.cluster.discovery import ServiceView
from pmlb.cluster.session import Session
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.keys import SERVING, Health, Keys
from pmlb.store.memory import MemoryStore


def test_the_first_result_of_a_term_is_written_even_if_the_view_shows_it() -> None:
    """After etcd is replaced (or the lease that held the key ends), the view
    can still show this node's own earlier write: a new term must not trust it."""

    async def scenario() -> None:
        store = MemoryStore()
        keys = Keys("/p")
        view = ServiceView(store, keys, "echo", lambda specs: None)
        checker = Checker(store, keys, Session(store, 10), view, "n2", CheckSettings())
        spec = UpstreamSpec(id="u1", addr="127.0.0.1:1")
        channel = grpc.aio.insecure_channel(spec.addr)  # never used: no probe is sent
        checker._probes["u1"] = _Probe(spec.addr, channel)
        health_key = keys.health("echo", "u1")
        term1, term2 = await store.grant(10), await store.grant(10)

        await checker._record(spec, True, "SERVING", lease=term1)  # term 1
        first = await store.get(health_key)
        assert first is not None
        assert first.lease == term1
        await checker._record(spec, True, "SERVING", lease=term1)  # unchanged: no write
        assert await store.get(health_key) == first
        # The view holds this node's write (the watch echoed it).
        view.health["u1"] = Health(SERVING, "t", "n2", "SERVING")
        # A new term (a new lease, perhaps a new etcd): the view still shows
        # the old write, but it may be gone; the first result is written.
        checker._forget_states()
        await checker._record(spec, True, "SERVING", lease=term2)
        second = await store.get(health_key)
        assert second is not None
        assert (second.lease, second.mod_revision > first.mod_revision) == (term2, True)
        await channel.close()

    asyncio.run(scenario())
