"""The checker's write decision across terms (pure logic: a recording store
stands in for etcd; the real-etcd behaviour is in test_etcd_cluster)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from pmlb.cluster.checker import Checker, CheckSettings, _Probe
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.keys import SERVING, Health, Keys


class RecordingStore:
    def __init__(self) -> None:
        self.puts: list[tuple[str, str, int | None]] = []

    async def put(self, key: str, value: str, lease: int | None = None) -> None:
        self.puts.append((key, value, lease))


def test_the_first_result_of_a_term_is_written_even_if_the_view_shows_it() -> None:
    """After etcd is replaced (or the lease that held the key ends), the view
    can still show this node's own earlier write: a new term must not trust it."""
    store = RecordingStore()
    view = SimpleNamespace(service="echo", health={})
    checker = Checker(
        cast(Any, store), Keys("/p"), cast(Any, None), cast(Any, view), "n2", CheckSettings()
    )
    spec = UpstreamSpec(id="u1", addr="127.0.0.1:1")
    checker._probes["u1"] = _Probe(spec.addr, cast(Any, None))

    async def scenario() -> None:
        await checker._record(spec, True, "SERVING", lease=1)  # term 1
        assert len(store.puts) == 1
        await checker._record(spec, True, "SERVING", lease=1)  # unchanged: no write
        assert len(store.puts) == 1
        # The view holds this node's write (the watch echoed it).
        view.health["u1"] = Health(SERVING, "t", "n2", "SERVING")
        # A new term (a new lease, perhaps a new etcd): the view still shows
        # the old write, but it may be gone; the first result is written.
        checker._forget_states()
        await checker._record(spec, True, "SERVING", lease=2)
        assert len(store.puts) == 2
        assert store.puts[-1][2] == 2

    asyncio.run(scenario())
