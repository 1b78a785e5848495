"""dataplane.probation: the rules that tell a poison message from the marks
that shared its link (issue [18]: they were spread over mark, conn, plane and
link). One worker's rules alone, then two workers sharing the node-wide lock
(the real flock-based NodeProbation in a temporary run directory)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pmlb.dataplane.probation import BREAK_HOLD, Probation
from pmlb.dataplane.siblings import NodeProbation
from tests.support import async_wait_until


class Mark:
    """A suspect: only its identity matters here."""


def test_one_suspect_per_upstream_and_each_way_out() -> None:
    p: Probation[Mark] = Probation()
    a, b, c = Mark(), Mark(), Mark()
    assert p.begin("u1", a)
    assert not p.begin("u1", b), "u1 has a suspect on probation"
    assert p.begin("u2", b)
    assert (p.free("u1"), p.free("u3"), p.holder("u2")) == (False, True, b)
    # Acknowledged frames clear a suspect wherever it is.
    assert p.cleared(a) == "u1"
    assert p.cleared(a) is None
    assert p.begin("u1", c)
    # Leaving (or expiring) ends only the suspect's own probation.
    assert not p.left("u1", b)
    assert not p.expired("u2", c)
    assert p.expired("u2", b)
    assert p.left("u1", c)
    assert p.broke("u1") is None
    assert p.begin("u1", a)
    assert p.broke("u1") is a
    assert p.free("u1")
    assert not p.shared


async def test_workers_share_one_probation_per_upstream(tmp_path: Path) -> None:
    async with asyncio.timeout(10):
        lock_a, lock_b = NodeProbation(str(tmp_path)), NodeProbation(str(tmp_path))
        try:
            w0: Probation[Mark] = Probation(lock_a)
            w1: Probation[Mark] = Probation(lock_b)
            assert w0.shared
            a, b = Mark(), Mark()
            assert w0.begin("u1", a)
            assert not w1.begin("u1", b), "the sibling's suspect is on probation on u1"
            assert w0.cleared(a) == "u1"
            assert w1.begin("u1", b)
            # The link broke with b on probation: the lock stays held a while,
            # so w0's suspects do not go into a connection that is dead.
            assert w1.broke("u1") is b
            assert not w0.begin("u1", a)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await async_wait_until(lambda: w0.begin("u1", a), BREAK_HOLD + 5, "the hold over")
            assert loop.time() - t0 >= BREAK_HOLD * 0.9
        finally:
            lock_a.close()
            lock_b.close()
