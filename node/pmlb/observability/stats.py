"""The node's counters.

Plain integer attributes, bumped inline on the data path (an attribute add
costs a few nanoseconds; a prometheus_client Counter.inc takes a lock). The
admin endpoint renders them in the Prometheus text format when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Final

# Bucket upper bounds, in seconds.
DURATION_BUCKETS: Final = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Histogram:
    """A fixed-bucket histogram cheap enough for the data path (a bisect and
    two adds, no lock); rendered as a Prometheus histogram when scraped."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class NodeStats:
    __slots__ = (
        "accepted",
        "ack_latency",
        "bad_frames_from_upstream",
        "batches_in",
        "batches_out",
        "bytes_in",
        "bytes_out",
        "closed",
        "connection_duration",
        "credit_stalls",
        "failover_time",
        "failovers",
        "frames_in",
        "frames_out",
        "frames_too_large",
        "framing_errors",
        "garbage_batches",
        "limited",
        "link_breaks",
        "move_timeouts",
        "moves",
        "no_upstream",
        "open",
        "pings",
        "poisoned",
        "proxy_errors",
        "refused_pushes",
        "replay_overflows",
        "stale_replies",
        "unknown_mark_frames",
        "write_overflows",
    )

    def __init__(self) -> None:
        self.accepted = 0
        # How long client connections lived; how long a mark waited between its
        # link breaking and its resume elsewhere; how long a link took to answer
        # after we sent it something (acknowledgement latency, per batch).
        self.connection_duration = Histogram(DURATION_BUCKETS)
        self.failover_time = Histogram(LATENCY_BUCKETS)
        self.ack_latency = Histogram(LATENCY_BUCKETS)
        self.open = 0
        self.closed: Counter[str] = Counter()
        self.limited: Counter[str] = Counter()  # connections refused by a limit
        # client -> upstream payload bytes / frames; upstream -> client
        self.bytes_in = 0
        self.frames_in = 0
        self.bytes_out = 0
        self.frames_out = 0
        self.batches_in = 0
        self.batches_out = 0
        self.garbage_batches = 0
        self.unknown_mark_frames = 0
        self.bad_frames_from_upstream = 0
        self.link_breaks = 0
        self.credit_stalls = 0
        self.failovers = 0
        self.proxy_errors = 0
        self.moves = 0
        self.replay_overflows = 0
        self.frames_too_large = 0
        self.framing_errors = 0
        self.no_upstream = 0
        self.write_overflows = 0
        self.poisoned = 0  # marks closed: frames in flight on two links that broke
        self.stale_replies = 0  # late frames from an upstream a move timed out on
        self.move_timeouts = 0
        self.pings = 0  # liveness pings sent on links
        self.refused_pushes = 0  # frames for marks bound elsewhere, not allowed


class HandoverStats:
    """What /metrics and the dashboards say of handovers, in this process."""

    __slots__ = (
        "failed",
        "kept",
        "last_error",
        "last_seconds",
        "marks_in",
        "marks_out",
        "pause",
        "pause_max",
        "state",
        "transfer_seconds",
    )

    def __init__(self) -> None:
        self.state = "none"  # none, giving, taking, given, taken, failed
        self.marks_out = 0  # handed to a successor
        self.marks_in = 0  # taken from a predecessor
        self.kept = 0  # not movable: left to drain here
        self.failed = 0  # handovers that did not complete
        self.last_error = ""
        self.last_seconds = 0.0
        # Per client: from the giver pausing its reads to the taker binding it.
        self.pause = Histogram(LATENCY_BUCKETS)
        self.pause_max = 0.0
        self.transfer_seconds = 0.0  # first batch to done, on the taking side

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "marks_out": self.marks_out,
            "marks_in": self.marks_in,
            "kept": self.kept,
            "failed": self.failed,
            "last_error": self.last_error,
            "last_seconds": round(self.last_seconds, 3),
            "pause_mean_ms": round(1000 * self.pause.total / self.pause.count, 1)
            if self.pause.count
            else 0.0,
            "pause_max_ms": round(1000 * self.pause_max, 1),
            "transfer_seconds": round(self.transfer_seconds, 3),
        }
