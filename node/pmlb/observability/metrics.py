"""Prometheus metrics for /metrics, built at scrape time.

The data path bumps plain integers (NodeStats, link and writer attributes);
this collector turns them into metric families only when scraped, so no lock
or label lookup is ever paid per message.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pmlb import __version__
from pmlb.aio import RESTARTS
from pmlb.observability.stats import NodeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name without _total, NodeStats attribute, help)
_COUNTERS = (
    ("pmlb_connections_accepted", "accepted", "Client connections accepted."),
    ("pmlb_frames_in", "frames_in", "Frames from clients to upstreams."),
    ("pmlb_frames_out", "frames_out", "Frames from upstreams to clients."),
    ("pmlb_in_bytes", "bytes_in", "Payload bytes from clients to upstreams."),
    ("pmlb_out_bytes", "bytes_out", "Payload bytes from upstreams to clients."),
    ("pmlb_batches_in", "batches_in", "Batches received from upstreams."),
    ("pmlb_garbage_batches", "garbage_batches", "Upstream messages that were not Batches."),
    ("pmlb_unknown_mark_frames", "unknown_mark_frames", "Upstream frames for unknown marks."),
    (
        "pmlb_bad_upstream_frames",
        "bad_frames_from_upstream",
        "Upstream frames that broke the protocol.",
    ),
    ("pmlb_frames_too_large", "frames_too_large", "Client messages over the max frame size."),
    ("pmlb_framing_errors", "framing_errors", "Clients closed for breaking their framing's rule."),
    ("pmlb_link_breaks", "link_breaks", "Links to upstreams that broke."),
    ("pmlb_credit_stalls", "credit_stalls", "Times a client stopped being read (backpressure)."),
    ("pmlb_no_upstream", "no_upstream", "Clients closed for lack of a routable upstream."),
    ("pmlb_write_overflows", "write_overflows", "Clients closed for not reading."),
    ("pmlb_failovers", "failovers", "Marks resumed on another upstream."),
    ("pmlb_moves", "moves", "Marks moved off a draining or removed upstream."),
    ("pmlb_replay_overflows", "replay_overflows", "Marks closed: replay buffer full."),
    (
        "pmlb_poisoned_marks",
        "poisoned",
        "Marks closed because their frames were in flight on two links that broke in a row.",
    ),
    (
        "pmlb_stale_replies",
        "stale_replies",
        "Frames dropped from an upstream after a move off it timed out.",
    ),
    ("pmlb_move_timeouts", "move_timeouts", "Moves (drain) the old upstream did not answer."),
    ("pmlb_link_pings", "pings", "Liveness pings sent to upstreams."),
    (
        "pmlb_refused_pushes",
        "refused_pushes",
        "Frames for marks bound elsewhere from upstreams not in --push-upstreams.",
    ),
    (
        "pmlb_proxy_header_errors",
        "proxy_errors",
        "Trusted peers closed for a bad, late or missing PROXY header.",
    ),
)


@dataclass(frozen=True, slots=True)
class LinkSample:
    upstream: str
    state: str
    marks: int
    routable: bool
    health: str
    draining: bool
    batches_sent: int
    frames_sent: int
    full_flushes: int
    failed_over: int


Extra = tuple[str, str, str, float]  # name, "gauge"|"counter", help, value


class NodeCollector(Collector):
    def __init__(
        self,
        stats: NodeStats,
        links: Callable[[], Iterable[LinkSample]],
        extra: Callable[[], Iterable[Extra]],
    ) -> None:
        self.stats = stats
        self.links = links
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, attr, help_ in _COUNTERS:
            yield CounterMetricFamily(name, help_, value=getattr(s, attr))
        yield GaugeMetricFamily("pmlb_marks_open", "Marks open on this node.", value=s.open)
        info = GaugeMetricFamily(
            "pmlb_build_info", "pmlb's version (value 1).", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        for name, help_, hist in (
            (
                "pmlb_connection_duration_seconds",
                "How long client connections lived.",
                s.connection_duration,
            ),
            (
                "pmlb_failover_seconds",
                "From a mark's link breaking to its resume on another upstream.",
                s.failover_time,
            ),
            (
                "pmlb_upstream_ack_latency_seconds",
                "From sending an upstream something to its next answer, per batch.",
                s.ack_latency,
            ),
        ):
            fam = HistogramMetricFamily(name, help_)
            fam.add_metric([], hist.cumulative(), sum_value=hist.total)
            yield fam
        restarts = CounterMetricFamily(
            "pmlb_task_restarts",
            "Supervised loops restarted after an unexpected error, by loop.",
            labels=["task"],
        )
        for task, n in sorted(RESTARTS.items()):
            restarts.add_metric([task], n)
        yield restarts
        closed = CounterMetricFamily(
            "pmlb_connections_closed", "Client connections closed, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.closed.items()):
            closed.add_metric([reason], n)
        yield closed
        limited = CounterMetricFamily(
            "pmlb_connections_refused", "Client connections refused by a limit.", labels=["limit"]
        )
        for reason, n in sorted(s.limited.items()):
            limited.add_metric([reason], n)
        yield limited
        up = GaugeMetricFamily(
            "pmlb_upstream_up", "1 while the link to the upstream is up.", labels=["upstream"]
        )
        marks = GaugeMetricFamily(
            "pmlb_upstream_marks", "Marks bound to the upstream.", labels=["upstream"]
        )
        routable = GaugeMetricFamily(
            "pmlb_upstream_routable",
            "1 while new marks may go to the upstream.",
            labels=["upstream"],
        )
        health = GaugeMetricFamily(
            "pmlb_upstream_health",
            "Health of the upstream as this node sees it (1 = current).",
            labels=["upstream", "status"],
        )
        batches = CounterMetricFamily(
            "pmlb_link_batches_sent",
            "Batches (gRPC messages) sent on the link.",
            labels=["upstream"],
        )
        frames = CounterMetricFamily(
            "pmlb_link_frames_sent", "Frames sent on the link.", labels=["upstream"]
        )
        flushes = CounterMetricFamily(
            "pmlb_link_flushes",
            "Batch flushes by cause: idle (the loop had nothing "
            "more) or full (size bound reached).",
            labels=["upstream", "cause"],
        )
        failed = CounterMetricFamily(
            "pmlb_upstream_failovers",
            "Marks moved off the upstream because its link broke.",
            labels=["upstream"],
        )
        for ln in self.links():
            up.add_metric([ln.upstream], int(ln.state == "up"))
            marks.add_metric([ln.upstream], ln.marks)
            routable.add_metric([ln.upstream], int(ln.routable))
            health.add_metric([ln.upstream, ln.health], 1)
            batches.add_metric([ln.upstream], ln.batches_sent)
            frames.add_metric([ln.upstream], ln.frames_sent)
            flushes.add_metric([ln.upstream, "full"], ln.full_flushes)
            flushes.add_metric([ln.upstream, "idle"], ln.batches_sent - ln.full_flushes)
            failed.add_metric([ln.upstream], ln.failed_over)
        yield from (up, marks, routable, health, batches, frames, flushes, failed)
        for name, kind, help_, value in self.extra():
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), help_, value=value)
            else:
                yield GaugeMetricFamily(name, help_, value=value)


def make_registry(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # The standard process_* metrics (CPU seconds, resident memory, open fds...).
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
