"""Balancers: weights honoured, load-awareness, client affinity."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from pmlb.dataplane.balancer import ClientHash, LeastMarks, PowerOfTwo, RoundRobin, make_balancer
from pmlb.errors import ConfigError


@dataclass
class T:
    id: str
    weight: int = 1
    load: int = 0


def test_round_robin_is_smooth_and_weighted() -> None:
    ts = [T("a", 5), T("b", 1), T("c", 1)]
    rr = RoundRobin()
    order = [rr.pick(ts, b"") for _ in range(7)]
    assert "".join(t.id for t in order if t) == "aabacaa"


def test_round_robin_spreads_evenly() -> None:
    ts = [T("a"), T("b"), T("c")]
    rr = RoundRobin()
    counts = Counter(rr.pick(ts, b"").id for _ in range(300))  # type: ignore[union-attr]
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_least_marks_prefers_lowest_load_per_weight() -> None:
    ts = [T("a", 1, 10), T("b", 4, 20), T("c", 1, 6)]
    assert LeastMarks().pick(ts, b"").id == "b"  # type: ignore[union-attr]


def test_least_marks_fills_up_evenly() -> None:
    ts = [T("a", 1), T("b", 2)]
    lm = LeastMarks()
    for _ in range(300):
        t = lm.pick(ts, b"")
        assert t is not None
        t.load += 1
    assert (ts[0].load, ts[1].load) == (100, 200)


def test_p2c_avoids_the_loaded_target_and_honours_weights() -> None:
    ts = [T("a", 1, 1000), T("b", 1, 0), T("c", 1, 0)]
    p = PowerOfTwo(random.Random(7))
    picks = Counter(p.pick(ts, b"").id for _ in range(1000))  # type: ignore[union-attr]
    assert picks["a"] == 0
    # Equal loads: the first candidate wins, and it is drawn by weight, so "a"
    # takes 9 in 10 picks: 1800 of 2000 (binomial sd 13.4; 5 sd either way).
    w = [T("a", 9), T("b", 1)]
    share = Counter(p.pick(w, b"").id for _ in range(2000))  # type: ignore[union-attr]
    assert 1800 - 67 <= share["a"] <= 1800 + 67, share


def test_hash_is_sticky_and_moves_little_when_a_target_leaves() -> None:
    ts = [T(f"u{i}") for i in range(5)]
    h = ClientHash()
    keys = [f"10.0.{i // 250}.{i % 250}".encode() for i in range(2000)]
    before = {k: h.pick(ts, k).id for k in keys}  # type: ignore[union-attr]
    assert before == {k: h.pick(ts, k).id for k in keys}  # type: ignore[union-attr]
    after = {k: h.pick(ts[:-1], k).id for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "u4" for k in moved)  # only u4's clients move
    spread = Counter(before.values())
    assert min(spread.values()) > 300  # ~400 each


def test_hash_honours_weights() -> None:
    ts = [T("a", 3), T("b", 1)]
    h = ClientHash()
    share = Counter(h.pick(ts, f"k{i}".encode()).id for i in range(4000))  # type: ignore[union-attr]
    assert 2700 < share["a"] < 3300


@pytest.mark.parametrize("name", ["round-robin", "least-marks", "p2c", "hash"])
def test_every_balancer_handles_empty_and_single(name: str) -> None:
    b = make_balancer(name)
    assert b.pick([], b"k") is None
    only = T("x")
    assert b.pick([only], b"k") is only


def test_unknown_balancer() -> None:
    with pytest.raises(ConfigError):
        make_balancer("random")
