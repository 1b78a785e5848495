"""The shipped Prometheus rules (deploy/prometheus/pmlb-rules.yml), checked by
their own tools: promtool, and a real Prometheus scraping a real node.

What an operator relies on: the file loads, every metric it names is one a
node exports, the recording rules produce series, and an alert fires when its
condition happens (every upstream stopped: PmlbNoRoutableUpstream).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import Cluster, Etcd
from tests.support import ROOT, Proc, free_port, http_get, needs, tcp_open, wait_until

RULES = ROOT / "deploy" / "prometheus" / "pmlb-rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_prometheus = needs(
    None
    if Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()
    else "Debian's prometheus package is not installed: apt-get install prometheus (.ci/run does)"
)


def _exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    doc = json.loads((ROOT / "deploy" / "grafana" / "pmlb-dashboard.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


@needs_prometheus
def test_promtool_accepts_the_rules() -> None:
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def _query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _alerts(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as resp:
        body = json.loads(resp.read())
    return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}


@needs_prometheus
def test_a_real_prometheus_fires_no_routable_upstream(
    cluster: Cluster, etcd: Etcd, tmp_path: Path
) -> None:
    echo = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", echo.addr)
    node = cluster.node(
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1"],
        extra=["--max-connections", "100"],
    )

    # Every metric the rules name is exported by a node (histograms as _bucket).
    _, text = http_get(f"http://127.0.0.1:{node.admin}/metrics")
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    names = re.compile(r"\b(?:pmlb|process)_[a-z_]+\b")
    named = {n for e in _exprs() + _dashboard_exprs() for n in names.findall(e)}
    missing = sorted(n for n in named if n not in exported)
    assert not missing, f"the rules or the dashboard name metrics no node exports: {missing}"

    # The same rules, with every `for:` and group interval cut to 1s so the
    # test need not wait minutes; expressions, labels and annotations are the
    # shipped ones.
    rules = tmp_path / "rules.yml"
    rules.write_text(re.sub(r"(?m)^(\s+(?:for|interval):) .*$", r"\1 1s", RULES.read_text()))
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: [{rules}]\n"
        "scrape_configs:\n  - job_name: pmlb\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{node.admin}']\n"
    )
    prom = Proc(
        "prometheus",
        [
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cluster.log_dir,
        program=PROMETHEUS,
    )
    cluster.procs.append(prom)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not prom.alive(), 30, "prometheus up")
    assert prom.alive(), prom.log()[-3000:]

    wait_until(lambda: _query(port, 'up{job="pmlb"} == 1'), 30, "the node scraped")

    def client_then(expr: str) -> object:
        """One client echo (traffic for the rate rules), then whether ``expr`` has data."""
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
            s.sendall(b"hi\n")
            assert s.recv(100).endswith(b" u1 hi\n")
        return _query(port, expr)

    wait_until(lambda: client_then("pmlb:marks_open:sum"), 30, "a recording rule's series")
    wait_until(lambda: client_then("pmlb:accepts:rate1m > 0"), 30, "accepts recorded as a rate")
    assert "PmlbNoRoutableUpstream" not in _alerts(port), "nothing wrong yet"
    # Every Grafana query parses and returns data from this one node.
    for expr in _dashboard_exprs():
        wait_until(lambda e=expr: _query(port, e), 30, f"dashboard query {expr!r}")

    echo.proc.signal(signal.SIGTERM)  # every upstream stopped
    state = wait_until(
        lambda: _alerts(port).get("PmlbNoRoutableUpstream") == "firing" and "firing",
        30,
        "PmlbNoRoutableUpstream firing",
    )
    assert state == "firing"
