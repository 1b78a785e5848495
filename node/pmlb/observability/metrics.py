"""Every metric pmlb exports, by name, built at scrape time.

This module is where a metric is added: its name, type and help, and what it
is made from. Nothing else defines one: the data path bumps plain integers
(``NodeStats``, link and writer attributes) and the composition root hands
over a ``NodeSample`` of its parts' figures; the collector turns them into
metric families only when scraped, so no lock or label lookup is ever paid per
message. A node of several workers adds the supervisor's own series
(``supervisor_text``) and merges the workers' by the rules below
(``GAUGE_MIN``/``GAUGE_MAX``); ``pmlb status`` reads a few by the names below.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

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
from pmlb.observability.stats import HandoverStats, NodeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Read back by name: `pmlb status` and the cluster page (from a node's
# /metrics), and the supervisor (from its workers').
MARKS_OPEN: Final = "pmlb_marks_open"
ACCEPTED_TOTAL: Final = "pmlb_connections_accepted_total"
FRAMES_IN_TOTAL: Final = "pmlb_frames_in_total"
FRAMES_OUT_TOTAL: Final = "pmlb_frames_out_total"
UPSTREAM_UP: Final = "pmlb_upstream_up"  # labels: upstream
UPSTREAM_MARKS: Final = "pmlb_upstream_marks"  # labels: upstream
UPSTREAM_FAILOVERS_TOTAL: Final = "pmlb_upstream_failovers_total"  # labels: upstream

# A node of several workers: gauges whose node-wide value is not the sum of
# the workers' (a link is up only if it is up on every worker; the checker
# flag is 1 if any worker is the checker). Everything else is summed.
GAUGE_MIN: Final = frozenset(
    {
        "pmlb_upstream_up",
        "pmlb_upstream_routable",
        "pmlb_etcd_session_up",
        "process_start_time_seconds",
        "process_max_fds",
    }
)
GAUGE_MAX: Final = frozenset(
    {
        "pmlb_build_info",
        "pmlb_max_connections",
        "pmlb_upstream_health",
        "pmlb_checker",
        "pmlb_etcd_malformed_values",
        "pmlb_etcd_last_keepalive_age_seconds",
        "pmlb_etcd_watch_last_event_age_seconds",
    }
)


@dataclass(frozen=True, slots=True)
class WorkerSample:
    index: int
    up: bool
    restarts: int


def supervisor_text(workers: Iterable[WorkerSample], failed_asks: int) -> str:
    """The supervisor's own series of a node of several workers, as text
    (its process_* are added by its registry)."""
    ws = list(workers)
    return "".join(
        [
            "# HELP pmlb_workers Worker processes of this node (--workers).\n",
            "# TYPE pmlb_workers gauge\n",
            f"pmlb_workers {len(ws)}\n",
            "# HELP pmlb_worker_up 1 while the worker is listening.\n",
            "# TYPE pmlb_worker_up gauge\n",
            *(f'pmlb_worker_up{{worker="{w.index}"}} {int(w.up)}\n' for w in ws),
            "# HELP pmlb_worker_restarts_total Times the worker was started again.\n",
            "# TYPE pmlb_worker_restarts_total counter\n",
            *(f'pmlb_worker_restarts_total{{worker="{w.index}"}} {w.restarts}\n' for w in ws),
            "# HELP pmlb_admin_worker_errors_total Requests a worker did not answer.\n",
            "# TYPE pmlb_admin_worker_errors_total counter\n",
            f"pmlb_admin_worker_errors_total {failed_asks}\n",
        ]
    )


def worker_marks_text(marks: Iterable[tuple[int, str]]) -> str:
    """``pmlb_worker_marks_open`` from each worker's MARKS_OPEN (index, value
    as Prometheus text); empty when no worker answered."""
    lines = [f'pmlb_worker_marks_open{{worker="{i}"}} {v}\n' for i, v in marks]
    if not lines:
        return ""
    return (
        "# HELP pmlb_worker_marks_open Marks open on the worker.\n"
        "# TYPE pmlb_worker_marks_open gauge\n" + "".join(lines)
    )


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


@dataclass(frozen=True, slots=True)
class EtcdSample:
    """The etcd session, the service view and the checker, as one node sees them."""

    session_up: bool
    lease_grants: int
    keepalive_age: float  # seconds since the last keepalive; -1: none yet
    view_resyncs: int
    malformed_values: int
    watch_age: float  # seconds since the watch's last event; -1: none yet
    is_checker: bool
    health_probes: int
    health_writes: int


@dataclass(frozen=True, slots=True)
class NodeSample:
    """What the node's parts other than NodeStats and the links report."""

    max_connections: int
    limit_pauses: int
    rate_pauses: int
    resource_errors: int
    tasks: int
    etcd: EtcdSample | None  # None: static upstreams, no etcd


# (name, "gauge"|"counter", help, the value from a sample); counters' names
# without _total, which prometheus_client adds.
_NODE: Final[tuple[tuple[str, str, str, Callable[[NodeSample], float]], ...]] = (
    ("pmlb_asyncio_tasks", "gauge",
     "asyncio tasks alive in the node (flat under churn: no task per connection).",
     lambda n: n.tasks),
    ("pmlb_max_connections", "gauge",
     "The --max-connections limit (0: none), for alerting near it.",
     lambda n: n.max_connections),
    ("pmlb_accept_limit_pauses", "counter", "Times accepting paused at --max-connections.",
     lambda n: n.limit_pauses),
    ("pmlb_accept_rate_pauses", "counter", "Times accepting paused at --accept-rate.",
     lambda n: n.rate_pauses),
    ("pmlb_accept_resource_errors", "counter",
     "accept() failures for lack of file descriptors or memory (accepting paused).",
     lambda n: n.resource_errors),
)  # fmt: skip
_ETCD: Final[tuple[tuple[str, str, str, Callable[[EtcdSample], float]], ...]] = (
    ("pmlb_etcd_session_up", "gauge", "1 while the etcd lease is kept alive.",
     lambda e: e.session_up),
    ("pmlb_etcd_lease_grants", "counter", "Leases granted (re-registrations).",
     lambda e: e.lease_grants),
    ("pmlb_etcd_last_keepalive_age_seconds", "gauge",
     "Seconds since the last successful keepalive.", lambda e: e.keepalive_age),
    ("pmlb_etcd_view_resyncs", "counter", "Full re-lists of the service view.",
     lambda e: e.view_resyncs),
    ("pmlb_etcd_malformed_values", "gauge", "etcd values ignored as malformed.",
     lambda e: e.malformed_values),
    ("pmlb_checker", "gauge", "1 while this node is the service's checker.",
     lambda e: e.is_checker),
    ("pmlb_health_probes", "counter", "grpc.health.v1 checks sent to upstreams as checker.",
     lambda e: e.health_probes),
    ("pmlb_health_writes", "counter", "Health transitions written as checker.",
     lambda e: e.health_writes),
    ("pmlb_etcd_watch_last_event_age_seconds", "gauge",
     "Seconds since the service watch last delivered an event (-1: none yet).",
     lambda e: e.watch_age),
)  # fmt: skip


def _family(name: str, kind: str, help_: str, value: float) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, help_, value=value)
    return GaugeMetricFamily(name, help_, value=value)


def _handover(h: HandoverStats) -> Iterator[Metric]:
    """Live handovers (SIGUSR2, pmlb.node.handover) of this process."""
    marks = CounterMetricFamily(
        "pmlb_handover_marks",
        "Marks handed to a successor process (out) or taken from a predecessor (in).",
        labels=["direction"],
    )
    marks.add_metric(["out"], h.marks_out)
    marks.add_metric(["in"], h.marks_in)
    yield marks
    yield GaugeMetricFamily(
        "pmlb_handover_in_progress",
        "1 while this process hands over or takes over connections.",
        value=1 if h.state in ("giving", "taking") else 0,
    )
    yield GaugeMetricFamily(
        "pmlb_handover_kept_marks",
        "Marks the last handover left here to drain (TLS, half-closed, ...).",
        value=h.kept,
    )
    yield CounterMetricFamily(
        "pmlb_handovers_failed",
        "Handovers that did not complete (each worker of a node counts its own).",
        value=h.failed,
    )
    pause = HistogramMetricFamily(
        "pmlb_handover_pause_seconds",
        "Per client: from the old process pausing its reads to the new one resuming it.",
    )
    pause.add_metric([], h.pause.cumulative(), sum_value=h.pause.total)
    yield pause


class NodeCollector(Collector):
    def __init__(
        self,
        stats: NodeStats,
        links: Callable[[], Iterable[LinkSample]],
        sample: Callable[[], NodeSample],
        handover: HandoverStats | None = None,
    ) -> None:
        self.stats = stats
        self.links = links
        self.sample = sample
        self.handover = handover

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._links()
        node = self.sample()
        for name, kind, help_, get in _NODE:
            yield _family(name, kind, help_, float(get(node)))
        if node.etcd is not None:
            for name, kind, help_, get_e in _ETCD:
                yield _family(name, kind, help_, float(get_e(node.etcd)))
        if self.handover is not None:
            yield from _handover(self.handover)

    def _node(self) -> Iterator[Metric]:
        s = self.stats
        for name, attr, help_ in _COUNTERS:
            yield CounterMetricFamily(name, help_, value=getattr(s, attr))
        yield GaugeMetricFamily(MARKS_OPEN, "Marks open on this node.", value=s.open)
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

    def _links(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            UPSTREAM_UP, "1 while the link to the upstream is up.", labels=["upstream"]
        )
        marks = GaugeMetricFamily(
            UPSTREAM_MARKS, "Marks bound to the upstream.", labels=["upstream"]
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


def make_registry(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # The standard process_* metrics (CPU seconds, resident memory, open fds...).
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
