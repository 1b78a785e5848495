"""Write deploy/grafana/pmlb-dashboard.json from the panel list below.

    python scripts/gen_grafana.py        (make docs runs it)

The dashboard reads a Prometheus data source (chosen on import, variable
``datasource``) scraping every node's admin /metrics as job "pmlb", and uses
the recording rules of deploy/prometheus/pmlb-rules.yml where they exist.
tests/integration/test_prometheus_rules.py runs every query against a real
Prometheus scraping a real node; tests/unit/test_docs.py checks the file is
what this script writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "grafana" / "pmlb-dashboard.json"

# (title, unit, [(expr, legend)]) per row of panels.
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    (
        "Traffic",
        [
            (
                "Frames per second",
                "ops",
                [
                    ("pmlb:frames_in:rate1m", "in {{instance}}"),
                    ("pmlb:frames_out:rate1m", "out {{instance}}"),
                ],
            ),
            (
                "Bytes per second",
                "Bps",
                [
                    ("pmlb:bytes_in:rate1m", "in {{instance}}"),
                    ("pmlb:bytes_out:rate1m", "out {{instance}}"),
                ],
            ),
            ("Accepts per second", "ops", [("pmlb:accepts:rate1m", "{{instance}}")]),
        ],
    ),
    (
        "Marks",
        [
            ("Marks open", "short", [("sum by (instance) (pmlb_marks_open)", "{{instance}}")]),
            (
                "Marks per upstream",
                "short",
                [("sum by (upstream) (pmlb_upstream_marks)", "{{upstream}}")],
            ),
            (
                "Closes by reason",
                "ops",
                [("pmlb:closes_by_reason:rate5m", "{{reason}}")],
            ),
        ],
    ),
    (
        "Upstreams",
        [
            (
                "Routable upstreams per node",
                "short",
                [("sum by (instance) (pmlb_upstream_routable)", "{{instance}}")],
            ),
            (
                "Failovers per second",
                "ops",
                [("pmlb:failovers:rate5m", "{{instance}}")],
            ),
            (
                "Frames per batch on each link",
                "short",
                [("pmlb:link_frames_per_batch:ratio5m", "{{instance}} -> {{upstream}}")],
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Upstream ack latency p99",
                "s",
                [("pmlb:upstream_ack_latency_seconds:p99_5m", "{{instance}}")],
            ),
            ("Failover time p99", "s", [("pmlb:failover_seconds:p99_5m", "p99")]),
            (
                "Connection duration p50",
                "s",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(pmlb_connection_duration_seconds_bucket[5m])))",
                        "p50",
                    )
                ],
            ),
        ],
    ),
    (
        "Cluster",
        [
            ("etcd session up", "short", [("pmlb_etcd_session_up", "{{instance}}")]),
            ("Checker", "short", [("pmlb_checker", "{{instance}}")]),
            (
                "File descriptors used",
                "percentunit",
                [
                    (
                        'process_open_fds{job="pmlb"} / process_max_fds{job="pmlb"}',
                        "{{instance}}",
                    )
                ],
            ),
        ],
    ),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> Any:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[Any] = []
    pid, y = 1, 0
    for row_title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(row):
            panels.append(panel(pid, title, unit, targets, 8 * i, y))
            pid += 1
        y += 8
    return {
        "title": "pmlb",
        "uid": "pmlb-overview",
        "description": "pmlb nodes: traffic, marks, upstreams, latency, cluster state.",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "tags": ["pmlb"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


def expressions() -> list[str]:
    return [expr for _, row in ROWS for _, _, targets in row for expr, _ in targets]


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
