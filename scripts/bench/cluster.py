"""`make bench-cluster`: what a cluster costs etcd, measured at 20 nodes x 200 upstreams.

Starts on loopback one etcd, 200 SDK echo upstreams (in 4 processes, 50 ports
each; each port is one upstream registration), and 20 `pmlb node --workers 1`
processes of one service, then measures:

* start-up: time until every node has a link up to every upstream;
* the steady state over a window: etcd requests/s (all gRPC methods) and per
  node, watch responses/s per node, lease keep-alives/s per node (from etcd's
  own /metrics), checker probes/s (the elected checker's
  pmlb_health_probes_total);
* `put` -> routed: PUTS new upstream keys, each timed from the put (etcd's
  JSON gateway, no etcdctl start-up) to the "link ... up" line of every node's
  log (millisecond timestamps on this machine's clock); p50, p99, max;
* etcd restart: etcd is SIGKILLed and restarted on the same data; time until
  every node's etcd session is healthy again and all 20 registrations are
  back.

Prints a table and writes bench-results/cluster-latest.{json,md}. A
measurement, not a test: nothing asserts on speed. Everything started is
stopped by PID at the end.

    python scripts/bench/cluster.py [--nodes 20] [--upstreams 200] [--puts 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from pmlb.testing.localetcd import LocalEtcd

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/pmlb"
SERVICE = "echo"
PER_PROCESS = 50
LINK_UP = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* pmlb\.link: link (\S+) \(.*\) up:"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_block(n: int) -> int:
    """A first port such that first..first+n-1 are all free."""
    for first in range(21000, 60000 - n, 997):
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit("bench-cluster: no block of free ports")


def etcd_put(url: str, key: str, value: str) -> None:
    body = json.dumps(
        {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(value.encode()).decode(),
        }
    ).encode()
    req = urllib.request.Request(f"{url}/v3/kv/put", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def etcd_count(url: str, prefix: str) -> int:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps(
        {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
            "count_only": True,
        }
    ).encode()
    req = urllib.request.Request(f"{url}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=2) as r:
        return int(json.loads(r.read()).get("count", 0))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


class Cluster:
    def __init__(self, nodes: int, upstreams: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pmlb-bench-cluster-"))
        self.etcd = LocalEtcd(log_path=self.tmp / "etcd.log")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n_nodes = nodes
        self.n_upstreams = upstreams
        self.admin: list[int] = []
        self.first_port = 0

    def spawn(self, args: list[str], name: str, **kw: Any) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        p = subprocess.Popen(
            args, stdout=kw.pop("stdout", log), stderr=subprocess.STDOUT, cwd=ROOT, **kw
        )
        self.procs.append(p)
        return p

    def start(self) -> float:
        self.etcd.start()
        self.first_port = port_block(self.n_upstreams)
        for k in range(0, self.n_upstreams, PER_PROCESS):
            n = min(PER_PROCESS, self.n_upstreams - k)
            helper = str(ROOT / "scripts/bench/many_upstreams.py")
            p = self.spawn(
                [sys.executable, helper, str(self.first_port + k), str(n)],
                f"upstreams-{k}",
                stdout=subprocess.PIPE,
            )
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"READY":
                raise SystemExit("bench-cluster: upstreams did not start")
        for i in range(self.n_upstreams):
            etcd_put(
                self.etcd.url,
                f"{PREFIX}/services/{SERVICE}/upstreams/u{i}",
                f"127.0.0.1:{self.first_port + i}",
            )
        t0 = time.monotonic()
        for i in range(self.n_nodes):
            admin = free_port()
            self.admin.append(admin)
            args = ["node", "--workers", "1", "--node-id", f"n{i}", "--etcd", self.etcd.url]
            args += ["--service", SERVICE, "--framing", "line"]
            args += ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{admin}"]
            self.spawn(
                [sys.executable, "-m", "pmlb", *args],
                f"node-n{i}",
            )
        deadline = time.monotonic() + 300
        pending = set(range(self.n_nodes))
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                try:
                    text = scrape(f"http://127.0.0.1:{self.admin[i]}/metrics")
                except OSError:
                    continue
                if metric_sum(text, "pmlb_upstream_up") >= self.n_upstreams:
                    pending.discard(i)
            time.sleep(0.5)
        if pending:
            raise SystemExit(f"bench-cluster: nodes {sorted(pending)} never linked every upstream")
        return time.monotonic() - t0

    def node_log(self, i: int) -> str:
        return (self.tmp / f"node-n{i}.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.etcd.stop()


def steady(c: Cluster, window: float) -> dict[str, float]:
    def sample() -> tuple[str, float]:
        probes = 0.0
        for a in c.admin:
            probes += metric_sum(
                scrape(f"http://127.0.0.1:{a}/metrics"), "pmlb_health_probes_total"
            )
        return scrape(f"{c.etcd.url}/metrics"), probes

    e0, p0 = sample()
    t0 = time.monotonic()
    time.sleep(window)
    e1, p1 = sample()
    dt = time.monotonic() - t0
    n = c.n_nodes

    def rate(name: str, **labels: str) -> float:
        return (metric_sum(e1, name, **labels) - metric_sum(e0, name, **labels)) / dt

    requests = rate("grpc_server_handled_total") + rate(
        "grpc_server_msg_received_total", grpc_type="bidi_stream"
    )
    return {
        "window_s": round(dt, 1),
        "etcd_requests_per_s": round(requests, 1),
        "etcd_requests_per_s_per_node": round(requests / n, 2),
        "watch_responses_per_s_per_node": round(
            rate("grpc_server_msg_sent_total", grpc_method="Watch") / n, 3
        ),
        "keepalives_per_s_per_node": round(
            rate("grpc_server_msg_received_total", grpc_method="LeaseKeepAlive") / n, 3
        ),
        "checker_probes_per_s": round((p1 - p0) / dt, 1),
    }


def put_to_route(c: Cluster, puts: int) -> list[float]:
    samples: list[float] = []
    for k in range(puts):
        uid = f"new{k}"
        t0 = time.time()
        etcd_put(
            c.etcd.url,
            f"{PREFIX}/services/{SERVICE}/upstreams/{uid}",
            f"127.0.0.1:{c.first_port + k}",
        )
        deadline = time.monotonic() + 30
        seen: dict[int, float] = {}
        while len(seen) < c.n_nodes and time.monotonic() < deadline:
            for i in range(c.n_nodes):
                if i in seen:
                    continue
                for line in c.node_log(i).splitlines()[-400:]:
                    m = LINK_UP.match(line)
                    if m and m.group(2) == uid:
                        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                        seen[i] = at - t0
                        break
            time.sleep(0.05)
        if len(seen) < c.n_nodes:
            raise SystemExit(f"bench-cluster: {uid} not routed on every node within 30 s")
        samples += seen.values()
    return samples


def etcd_restart(c: Cluster) -> float:
    c.etcd.kill()
    c.etcd.start(fresh=False)
    t0 = time.monotonic()
    deadline = t0 + 120
    while time.monotonic() < deadline:
        healthy = 0
        for a in c.admin:
            try:
                text = scrape(f"http://127.0.0.1:{a}/metrics")
            except OSError:
                continue
            healthy += metric_sum(text, "pmlb_etcd_session_up") == 1
        try:
            registered = etcd_count(c.etcd.url, f"{PREFIX}/nodes/")
        except OSError:
            registered = 0
        if healthy == c.n_nodes and registered == c.n_nodes:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit("bench-cluster: the cluster did not converge within 120 s of etcd's restart")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> int:
    # SIGTERM (a CI timeout, kill) runs the finally below that stops every
    # process the bench started, instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--upstreams", type=int, default=200)
    ap.add_argument("--puts", type=int, default=20)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    c = Cluster(args.nodes, args.upstreams)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nodes": args.nodes,
        "upstreams": args.upstreams,
    }
    try:
        report["startup_all_linked_s"] = round(c.start(), 1)
        print("bench-cluster: all linked", file=sys.stderr, flush=True)
        report["steady"] = steady(c, args.window)
        samples = put_to_route(c, args.puts)
        report["put_to_route_ms"] = {
            "samples": len(samples),
            "p50": round(statistics.median(samples) * 1000, 1),
            "p99": round(pct(samples, 0.99) * 1000, 1),
            "max": round(max(samples) * 1000, 1),
        }
        report["etcd_restart_converged_s"] = round(etcd_restart(c), 2)
        rss = 0
        for p in c.procs:
            if "node" in " ".join(map(str, p.args)):
                status = Path(f"/proc/{p.pid}/status").read_text()
                rss += int(
                    next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]
                )
        report["node_rss_mib_each"] = round(rss / 1024 / args.nodes, 1)
    finally:
        c.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster-latest.json").write_text(json.dumps(report, indent=1))
    table = render(report)
    (out / "cluster-latest.md").write_text(table)
    print(table)
    return 0


def render(r: dict[str, Any]) -> str:
    s, p = r["steady"], r["put_to_route_ms"]
    rows = [
        ("nodes x upstream registrations", f"{r['nodes']} x {r['upstreams']}"),
        ("start-up until every node linked every upstream", f"{r['startup_all_linked_s']} s"),
        ("etcd requests/s, whole cluster (steady)", f"{s['etcd_requests_per_s']}"),
        ("etcd requests/s per node", f"{s['etcd_requests_per_s_per_node']}"),
        ("watch responses/s per node", f"{s['watch_responses_per_s_per_node']}"),
        ("lease keep-alives/s per node", f"{s['keepalives_per_s_per_node']}"),
        ("checker probes/s (one elected checker)", f"{s['checker_probes_per_s']}"),
        (
            f"put -> routed on every node ({p['samples']} samples)",
            f"p50 {p['p50']} ms, p99 {p['p99']} ms, max {p['max']} ms",
        ),
        (
            "etcd SIGKILL + restart -> all sessions and registrations back",
            f"{r['etcd_restart_converged_s']} s",
        ),
        ("node RSS with 200 links", f"{r['node_rss_mib_each']} MiB each"),
    ]
    lines = [f"pmlb bench-cluster {r['when']}", "", "| figure | measured |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n" + sizing(r)


# The sizing model's assumptions (stated in its output; change them here).
MARKS_PER_PROCESS = 100_000  # idle-ish marks one node process (one core) carries
WORKERS_PER_HOST = 4  # --workers: one per core of a 4-core host
SPARE_HOSTS = 1  # N+1: a host can fail or drain without overloading the rest


def sizing(r: dict[str, Any]) -> str:
    """Nodes, etcd load and DNS records for 10k..10M marks, from this run's
    per-node etcd rates and `make bench`'s RSS per idle mark (bench-results/
    latest.json, when present)."""
    per_node = r["steady"]["etcd_requests_per_s_per_node"]
    latest = ROOT / "bench-results" / "latest.json"
    rss = None
    if latest.exists():
        idle = json.loads(latest.read_text()).get("idle", {})
        rss = idle.get("pmlb", {}).get("rss_per_conn_bytes")
    lines = [
        "",
        f"Sizing model: {MARKS_PER_PROCESS:,} marks per node process (one core), "
        f"{WORKERS_PER_HOST} workers per host, {SPARE_HOSTS} spare host; etcd load per node "
        f"process as measured above ({per_node} requests/s); memory from `make bench`'s "
        f"{rss if rss is not None else '?'} B per idle mark. Nothing in etcd grows with marks.",
        "",
        "| concurrent marks | node processes | hosts (= DNS records) | mark memory, all nodes "
        "| etcd requests/s from nodes |",
        "|---|---|---|---|---|",
    ]
    for marks in (10_000, 100_000, 1_000_000, 10_000_000):
        procs = -(-marks // MARKS_PER_PROCESS)
        hosts = -(-procs // WORKERS_PER_HOST) + SPARE_HOSTS
        procs_total = hosts * WORKERS_PER_HOST
        mem = f"{marks * rss / 2**30:.2f} GiB" if rss else "-"
        lines.append(
            f"| {marks:,} | {procs_total} | {hosts} | {mem} | {procs_total * per_node:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
