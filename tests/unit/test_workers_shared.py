"""What a node's worker processes share: merged metrics, the node-wide
connection count, the per-upstream probation lock."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmlb.dataplane.siblings import NodeCounters, NodeProbation, create_counters
from pmlb.node.aggregate import merge_metrics

W0 = """# HELP pmlb_frames_in_total Frames from clients to upstreams.
# TYPE pmlb_frames_in_total counter
pmlb_frames_in_total 7.0
# HELP pmlb_upstream_up 1 while the link to the upstream is up.
# TYPE pmlb_upstream_up gauge
pmlb_upstream_up{upstream="u1"} 1.0
pmlb_upstream_up{upstream="u2"} 1.0
# HELP pmlb_checker 1 while this node is the service's checker.
# TYPE pmlb_checker gauge
pmlb_checker 1.0
# HELP pmlb_marks_open Marks open on this node.
# TYPE pmlb_marks_open gauge
pmlb_marks_open 3.0
# HELP pmlb_failover_seconds Time to resume.
# TYPE pmlb_failover_seconds histogram
pmlb_failover_seconds_bucket{le="0.1"} 1.0
pmlb_failover_seconds_bucket{le="+Inf"} 2.0
pmlb_failover_seconds_count 2.0
pmlb_failover_seconds_sum 0.5
"""
W1 = """# HELP pmlb_frames_in_total Frames from clients to upstreams.
# TYPE pmlb_frames_in_total counter
pmlb_frames_in_total 5.0
# HELP pmlb_upstream_up 1 while the link to the upstream is up.
# TYPE pmlb_upstream_up gauge
pmlb_upstream_up{upstream="u1"} 0.0
pmlb_upstream_up{upstream="u2"} 1.0
# HELP pmlb_checker 1 while this node is the service's checker.
# TYPE pmlb_checker gauge
pmlb_checker 0.0
# HELP pmlb_marks_open Marks open on this node.
# TYPE pmlb_marks_open gauge
pmlb_marks_open 4.0
# HELP pmlb_failover_seconds Time to resume.
# TYPE pmlb_failover_seconds histogram
pmlb_failover_seconds_bucket{le="0.1"} 0.0
pmlb_failover_seconds_bucket{le="+Inf"} 1.0
pmlb_failover_seconds_count 1.0
pmlb_failover_seconds_sum 2.0
"""


def _samples(text: bytes) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_merged_metrics_read_as_one_node() -> None:
    m = _samples(merge_metrics([W0, W1]))
    assert m["pmlb_frames_in_total"] == 12, "counters add up"
    assert m["pmlb_marks_open"] == 7, "additive gauges add up"
    assert m['pmlb_upstream_up{upstream="u1"}'] == 0, "a link is up only if up on every worker"
    assert m['pmlb_upstream_up{upstream="u2"}'] == 1
    assert m["pmlb_checker"] == 1, "the node is the checker if any worker is"
    assert m['pmlb_failover_seconds_bucket{le="0.1"}'] == 1
    assert m['pmlb_failover_seconds_bucket{le="+Inf"}'] == 3
    assert m["pmlb_failover_seconds_count"] == 3
    assert m["pmlb_failover_seconds_sum"] == 2.5


def test_merged_metrics_keep_labels_escaped_and_refuse_garbage() -> None:
    text = '# TYPE x gauge\nx{a="q\\"uote\\\\back\\nline"} 2.0\n'
    m = _samples(merge_metrics([text, text]))
    assert m['x{a="q"uote\\back\nline"}'] == 4
    with pytest.raises(ValueError, match="could not convert"):
        merge_metrics(["pmlb_x{ 1\n"])


def _hold(rundir: str, index: int, n: int, ready: multiprocessing.synchronize.Event) -> None:
    c = NodeCounters(rundir, index, 2)
    c.publish(n)
    ready.set()
    while True:  # until terminated
        os.sched_yield()


def test_node_counters_add_every_workers_count(tmp_path: Path) -> None:
    create_counters(str(tmp_path), 2)
    mine = NodeCounters(str(tmp_path), 0, 2)
    mine.publish(3)
    ready = multiprocessing.get_context("fork").Event()
    other = multiprocessing.get_context("fork").Process(
        target=_hold, args=(str(tmp_path), 1, 40, ready)
    )
    other.start()
    try:
        assert ready.wait(10)
        assert mine.total() == 43, "a sibling process's count is seen"
    finally:
        other.terminate()
        other.join()
    mine.close()
    assert NodeCounters(str(tmp_path), 1, 2).total() == 40, "closing publishes 0 for itself"


def test_probation_is_one_suspect_per_upstream_across_processes(tmp_path: Path) -> None:
    async def run() -> None:
        a, b = NodeProbation(str(tmp_path)), NodeProbation(str(tmp_path))
        assert a.acquire("u1")
        assert not a.acquire("u1"), "one suspect at a time, this worker too"
        assert not b.acquire("u1"), "a sibling waits (flock: another open file)"
        assert b.acquire("u2"), "other upstreams are free"
        a.release("u1", hold=0.2)  # the link broke with the suspect on it
        assert not b.acquire("u1"), "held a little while the siblings notice the break"
        await asyncio.sleep(0.3)
        assert b.acquire("u1")
        b.close()
        assert a.acquire("u1"), "a closed holder (a dead worker) frees the lock"
        a.close()

    asyncio.run(run())
