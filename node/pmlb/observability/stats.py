"""The node's counters.

Plain integer attributes, bumped inline on the data path (an attribute add
costs a few nanoseconds; a prometheus_client Counter.inc takes a lock). The
admin endpoint renders them in the Prometheus text format when scraped.
"""

from __future__ import annotations

from collections import Counter


class NodeStats:
    __slots__ = (
        "accepted",
        "bad_frames_from_upstream",
        "batches_in",
        "batches_out",
        "bytes_in",
        "bytes_out",
        "closed",
        "credit_stalls",
        "failovers",
        "frames_in",
        "frames_out",
        "frames_too_large",
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
        self.no_upstream = 0
        self.write_overflows = 0
        self.poisoned = 0  # marks closed: frames in flight on two links that broke
        self.stale_replies = 0  # late frames from an upstream a move timed out on
        self.move_timeouts = 0
        self.pings = 0  # liveness pings sent on links
        self.refused_pushes = 0  # frames for marks bound elsewhere, not allowed

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {k: getattr(self, k) for k in self.__slots__}
        out["closed"] = dict(self.closed)
        out["limited"] = dict(self.limited)
        return out
