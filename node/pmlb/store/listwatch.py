"""List, then watch: the one loop that follows a prefix of the store.

List everything under the prefix at revision R, then watch from R+1. A watch
that cannot go on (compaction, a cancelled watch, a replaced cluster:
``WatchReset``) lists again at once; a store that does not answer
(``StoreError``) is retried with ``aio.Backoff`` while the caller keeps what
it had (static stability: a node routes with its last view). Discovery and
``pmlb dns-sync`` follow etcd through it; a new follower of the store should
too rather than write the loop again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, NoReturn

from pmlb.aio import Backoff
from pmlb.store.base import KV, Event, Store, StoreError, WatchReset

# Retrying an unanswered store: 0.2 s doubling to 2 s (each call already
# waited up to its own deadline, so there is no point waiting long between).
STORE_RETRY: Final = (0.2, 2.0)


async def list_and_watch(
    store: Store,
    prefix: str,
    on_list: Callable[[int, list[KV]], None],
    on_events: Callable[[list[Event]], None],
    log: logging.Logger,
    what: str,
) -> NoReturn:
    """Follow ``prefix`` for good: ``on_list(revision, kvs)`` with the whole
    prefix (first, and after every reset), then ``on_events`` with each
    batch of changes. ``what`` says in the logs what is kept while the store
    is away ("keeping the last view")."""
    backoff = Backoff(*STORE_RETRY)
    while True:
        try:
            revision, kvs = await store.get_prefix(prefix)
            on_list(revision, kvs)
            backoff.reset()
            async for events in store.watch_prefix(prefix, revision + 1):
                on_events(events)
        except WatchReset as exc:
            log.warning("%s: %s; listing again", prefix, exc)
        except StoreError as exc:
            delay = backoff.next()
            log.warning("%s: %s; %s, retry in %.1fs", prefix, exc, what, delay)
            await asyncio.sleep(delay)
