"""Balancers: which upstream a new mark is bound to.

A balancer sees only the routable targets (the routing rule is applied before
it, in the pool) and picks one. Picks happen per new mark and per failover,
never per message. Every balancer honours weights:

* ``round-robin``  smooth weighted round-robin (nginx's algorithm): with weights
  5,1,1 the order is a,a,b,a,c,a,a - interleaved, not bursty.
* ``least-marks``  fewest bound marks per unit of weight; ties go round-robin.
* ``p2c``          power of two choices: two weighted-random candidates, the one
  with fewer marks per weight wins. Near least-marks quality, O(1), and no herd
  when many nodes decide at once on stale counts.
* ``hash``         weighted rendezvous hashing of the client IP, so a
  reconnecting client tends to reach the same upstream, and adding or removing
  an upstream moves only the keys it gains or loses.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from pmlb.errors import ConfigError
from pmlb.protocol.domain import BALANCERS


class Target(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def load(self) -> int: ...


T = TypeVar("T", bound=Target)


class Balancer(Protocol):
    name: str

    def pick(self, targets: Sequence[T], key: bytes) -> T | None:
        """Pick one of ``targets`` (all routable) for a mark whose client key is ``key``."""


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, targets: Sequence[T], key: bytes) -> T | None:
        if not targets:
            return None
        total = 0
        best: T | None = None
        best_cw = 0
        current = self._current
        for t in targets:
            cw = current.get(t.id, 0) + t.weight
            current[t.id] = cw
            total += t.weight
            if best is None or cw > best_cw:
                best, best_cw = t, cw
        assert best is not None
        current[best.id] = best_cw - total
        if len(current) > 2 * len(targets):  # forget upstreams that left
            live = {t.id for t in targets}
            for gone in [k for k in current if k not in live]:
                del current[gone]
        return best


class LeastMarks:
    name = "least-marks"

    def __init__(self) -> None:
        self._rr = RoundRobin()

    def pick(self, targets: Sequence[T], key: bytes) -> T | None:
        if not targets:
            return None
        best_score = min(t.load / t.weight for t in targets)
        tied = [t for t in targets if t.load / t.weight == best_score]
        return tied[0] if len(tied) == 1 else self._rr.pick(tied, key)


class PowerOfTwo:
    name = "p2c"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, targets: Sequence[T], key: bytes) -> T | None:
        if len(targets) <= 1:
            return targets[0] if targets else None
        weights = [t.weight for t in targets]
        a, b = self._rng.choices(targets, weights=weights, k=2)
        if a is b:
            # Draw the second among the others so the comparison means something.
            others = [t for t in targets if t is not a]
            b = self._rng.choices(others, weights=[t.weight for t in others], k=1)[0]
        return a if a.load / a.weight <= b.load / b.weight else b


def _unit_hash(key: bytes, target_id: str) -> float:
    digest = hashlib.blake2b(key + b"\x00" + target_id.encode(), digest_size=8).digest()
    # Map to (0, 1): never 0, so the log below is finite.
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 1)


class ClientHash:
    name = "hash"

    def pick(self, targets: Sequence[T], key: bytes) -> T | None:
        best: T | None = None
        best_score = -math.inf
        for t in targets:
            score = -t.weight / math.log(_unit_hash(key, t.id))
            if score > best_score:
                best, best_score = t, score
        return best


def make_balancer(name: str) -> Balancer:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-marks":
        return LeastMarks()
    if name == "p2c":
        return PowerOfTwo()
    if name == "hash":
        return ClientHash()
    raise ConfigError(f"unknown balancer {name!r} (choose from {', '.join(BALANCERS)})")
