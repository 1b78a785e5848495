"""Render the node's counters in the Prometheus text exposition format."""

from __future__ import annotations

from collections.abc import Iterable

from pmlb.observability.stats import NodeStats

_COUNTERS = (
    ("pmlb_connections_accepted_total", "accepted", "Client connections accepted."),
    ("pmlb_frames_in_total", "frames_in", "Frames from clients to upstreams."),
    ("pmlb_frames_out_total", "frames_out", "Frames from upstreams to clients."),
    ("pmlb_bytes_in_total", "bytes_in", "Payload bytes from clients to upstreams."),
    ("pmlb_bytes_out_total", "bytes_out", "Payload bytes from upstreams to clients."),
    ("pmlb_batches_in_total", "batches_in", "Batches received from upstreams."),
    ("pmlb_garbage_batches_total", "garbage_batches", "Upstream messages that were not Batches."),
    ("pmlb_unknown_mark_frames_total", "unknown_mark_frames", "Upstream frames for unknown marks."),
    (
        "pmlb_bad_upstream_frames_total",
        "bad_frames_from_upstream",
        "Upstream frames that broke the protocol.",
    ),
    ("pmlb_frames_too_large_total", "frames_too_large", "Client messages over the max frame size."),
    ("pmlb_link_breaks_total", "link_breaks", "Links to upstreams that broke."),
    ("pmlb_credit_stalls_total", "credit_stalls", "Times a client stopped being read."),
    ("pmlb_no_upstream_total", "no_upstream", "Clients closed for lack of a routable upstream."),
    ("pmlb_write_overflows_total", "write_overflows", "Clients closed for not reading."),
    ("pmlb_failovers_total", "failovers", "Marks resumed on another upstream."),
    ("pmlb_moves_total", "moves", "Marks moved off a draining or removed upstream."),
    ("pmlb_replay_overflows_total", "replay_overflows", "Marks closed: replay buffer full."),
)


def render(
    stats: NodeStats,
    links: Iterable[tuple[str, str, int, bool]],
    extra: Iterable[tuple[str, str, str, float]] = (),
) -> bytes:
    """``links`` yields (upstream id, state, marks bound, routable)."""
    out: list[str] = []
    for name, attr, help_ in _COUNTERS:
        out += [
            f"# HELP {name} {help_}",
            f"# TYPE {name} counter",
            f"{name} {getattr(stats, attr)}",
        ]
    out += [
        "# HELP pmlb_marks_open Marks open on this node.",
        "# TYPE pmlb_marks_open gauge",
        f"pmlb_marks_open {stats.open}",
    ]
    out += [
        "# HELP pmlb_connections_closed_total Client connections closed, by reason.",
        "# TYPE pmlb_connections_closed_total counter",
    ]
    out += [
        f'pmlb_connections_closed_total{{reason="{r}"}} {n}'
        for r, n in sorted(stats.closed.items())
    ]
    up_lines = [
        "# HELP pmlb_upstream_up Whether the link to an upstream is up.",
        "# TYPE pmlb_upstream_up gauge",
    ]
    bound_lines = [
        "# HELP pmlb_upstream_marks Marks bound to an upstream.",
        "# TYPE pmlb_upstream_marks gauge",
    ]
    for uid, state, marks, _routable in links:
        label = uid.replace("\\", "\\\\").replace('"', '\\"')
        up_lines.append(f'pmlb_upstream_up{{upstream="{label}"}} {int(state == "up")}')
        bound_lines.append(f'pmlb_upstream_marks{{upstream="{label}"}} {marks}')
    out += up_lines + bound_lines
    for name, kind, help_, value in extra:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
    return ("\n".join(out) + "\n").encode()
