"""Traces into a real OTLP/gRPC receiver, Prometheus metrics, the admin API, pmlb status."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsg
from prometheus_client.parser import text_string_to_metric_families

from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import Cluster, Etcd, both_transports
from tests.support import async_wait_until, http_get, wait_until


class Receiver(tsg.TraceServiceServicer):
    """An OTLP trace receiver: what Jaeger's collector port does, minus the UI."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def Export(self, request: tsp.ExportTraceServiceRequest, context: Any) -> Any:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append(
                        {
                            "name": sp.name,
                            "trace_id": sp.trace_id.hex(),
                            "span_id": sp.span_id.hex(),
                            "parent": sp.parent_span_id.hex(),
                            "attrs": {a.key: _value(a.value) for a in sp.attributes},
                            "resource": resource,
                        }
                    )
        return tsp.ExportTraceServiceResponse()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Echo(Handler):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(f"{self.name} {conn.mark} ".encode() + data)


@pytest.mark.asyncio
@both_transports
async def test_a_trace_per_mark_reaches_the_receiver(cluster: Cluster) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    receiver = Receiver()
    otlp = grpc.aio.server()
    tsg.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    await otlp.start()
    endpoint = f"http://127.0.0.1:{otlp_port}"
    provider = TracerProvider(resource=Resource.create({"service.name": "test-upstream"}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=100
        )
    )
    servers = {}
    for name in ("a", "b"):
        servers[name] = UpstreamServer(
            Echo(name), upstream_id=name, listen="127.0.0.1:0", tracer_provider=provider
        )
        await servers[name].start()
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"{n}=127.0.0.1:{s.port}" for n, s in servers.items()],
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
            extra=["--log-format", "json"],
        )
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            w.write(b"hi\n")
            first, mark = (await r.readuntil(b"\n")).decode().split()[:2]
            other = "b" if first == "a" else "a"

            def ours(name: str) -> list[dict[str, Any]]:
                return [s for s in receiver.named(name) if s["attrs"].get("pmlb.mark") == mark]

            # Open, not closed: its trace is visible already.
            await async_wait_until(lambda: ours("pmlb.bind"), 10, "bind span")
            bind = ours("pmlb.bind")[0]
            assert ours("pmlb.accept")[0]["trace_id"] == bind["trace_id"]
            assert not ours("pmlb.connection"), "the root span is still open"
            await async_wait_until(lambda: ours("pmlb.upstream.open"), 10, "upstream SDK span")
            up_span = ours("pmlb.upstream.open")[0]
            assert up_span["trace_id"] == bind["trace_id"], "the upstream joined the trace"

            await servers[first].stop(0)  # failover
            w.write(b"again\n")
            assert (await r.readuntil(b"\n")).decode().split()[:2] == [other, mark]
            w.close()
            await async_wait_until(lambda: ours("pmlb.connection"), 10, "root span")
        root = ours("pmlb.connection")[0]
        assert root["trace_id"] == bind["trace_id"]
        a = root["attrs"]
        assert a["pmlb.mark"] == mark
        assert a["client.address"] == "127.0.0.1"
        assert a["client.port"] > 0
        assert a["pmlb.service"] == "echo"
        assert a["pmlb.node_id"] == "n1"
        assert a["pmlb.upstreams"] == [first, other]
        assert a["pmlb.frames_in"] == 2
        assert a["pmlb.frames_out"] == 2
        assert a["pmlb.bytes_in"] == len(b"hi") + len(b"again")
        assert a["pmlb.close_reason"] == "client_closed"
        assert root["resource"]["service.name"] == "pmlb-node"
        assert root["resource"]["service.instance.id"] == "n1"
        # The log lines of this mark carry its trace id: from a log to Jaeger.
        logged = [
            json.loads(line)
            for line in node.proc.log().splitlines()
            if line.startswith("{") and f'"mark": "{mark}"' in line
        ]
        assert logged
        assert {r.get("trace_id") for r in logged if "trace_id" in r} == {root["trace_id"]}
        failover = ours("pmlb.failover")
        assert failover
        assert failover[0]["trace_id"] == root["trace_id"]
        assert failover[0]["attrs"]["pmlb.upstream"] == other
    finally:
        for s in servers.values():
            await s.stop(0)
        provider.shutdown()
        await otlp.stop(0)


def metric_samples(admin: int) -> dict[str, float]:
    _, text = http_get(f"http://127.0.0.1:{admin}/metrics")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


@both_transports
def test_metrics_move_with_traffic_and_closes(cluster: Cluster) -> None:
    import socket

    u1 = cluster.echo("u1")
    node = cluster.node([f"u1={u1.addr}"], extra=["--max-frame", "100"])
    before = metric_samples(node.admin)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        for i in range(10):
            s.sendall(f"m{i}\n".encode())
            assert s.recv(100).endswith(f" u1 m{i}\n".encode())
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"x" * 200)
        assert s.recv(100) == b""
    wait_until(lambda: metric_samples(node.admin)["pmlb_marks_open"] == 0, 10, "closed")
    after = metric_samples(node.admin)
    assert after["pmlb_frames_in_total"] - before["pmlb_frames_in_total"] == 10
    assert after["pmlb_frames_out_total"] - before["pmlb_frames_out_total"] == 10
    assert after["pmlb_in_bytes_total"] - before["pmlb_in_bytes_total"] == 20
    assert after['pmlb_connections_closed_total{reason="frame_too_large"}'] == 1
    closed = 'pmlb_connections_closed_total{reason="client_closed"}'
    assert after[closed] - before.get(closed, 0) == 1, "the first client, which hung up"
    assert after['pmlb_upstream_up{upstream="u1"}'] == 1
    assert after['pmlb_upstream_health{status="UNKNOWN",upstream="u1"}'] == 1
    # How frames are cut into batches depends on timing: only the bounds are
    # known. For the first client alone the node sent u1 its open, ten
    # messages and its close (12 frames), in at least one batch, and never
    # an empty batch.
    batches = after['pmlb_link_batches_sent_total{upstream="u1"}']
    sent = after['pmlb_link_frames_sent_total{upstream="u1"}']
    assert batches >= 1
    assert sent >= 12
    assert sent >= batches


def test_readyz_connections_and_drain(cluster: Cluster) -> None:
    import socket

    u1 = cluster.echo("u1")
    node = cluster.node([f"u1={u1.addr}"], extra=["--drain-timeout", "5"])
    assert http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 200
    socks = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(3)]
    for s in socks:
        s.sendall(b"hi\n")
        s.recv(100)
    status, body = http_get(f"http://127.0.0.1:{node.admin}/connections?limit=2")
    page = json.loads(body)
    assert status == 200
    assert len(page["marks"]) == 2
    assert page["next"]
    rest = json.loads(
        http_get(f"http://127.0.0.1:{node.admin}/connections?after={page['next']}")[1]
    )
    marks = [m["mark"] for m in page["marks"] + rest["marks"]]
    assert len(set(marks)) == 3
    assert all(m["upstream"] == "u1" and m["frames_in"] == 1 for m in page["marks"])
    only = json.loads(http_get(f"http://127.0.0.1:{node.admin}/connections?upstream=nope")[1])
    assert only["marks"] == []

    u1.proc.kill()
    wait_until(
        lambda: http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 503,
        10,
        "not ready without a routable upstream",
    )
    cluster.echo("u1", port=u1.port)
    wait_until(
        lambda: http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 200, 15, "ready again"
    )

    req = urllib.request.Request(f"http://127.0.0.1:{node.admin}/drain", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 503
    for s in socks:
        s.close()
    assert node.proc.proc.wait(15) == 0, "POST /drain ends the process cleanly"


def test_status_reports_a_two_node_cluster(etcd: Etcd, cluster: Cluster) -> None:
    import socket

    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    etcd.put(
        "/services/echo/upstreams/u2", json.dumps({"addr": u2.addr, "weight": 2, "drain": True})
    )
    nodes = [
        cluster.node([], node_id=f"n{i}", etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
        for i in (1, 2)
    ]
    held = []
    for node, count in zip(nodes, (2, 1), strict=True):
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
            s.sendall(b"hi\n")
            s.recv(100)
            held.append(s)
    wait_until(lambda: etcd.get("/services/echo/health/u1"), 10, "health written")

    def status() -> dict[str, Any]:
        out = etcd.pmlb("status", "--json")
        return dict(json.loads(out))

    report = status()
    assert [n["id"] for n in report["nodes"]] == ["n1", "n2"]
    assert [n["marks"] for n in report["nodes"]] == [2, 1]
    assert all(n["reachable"] and n["age_seconds"] >= 0 for n in report["nodes"])
    assert report["nodes"][0]["listen"] == [f"127.0.0.1:{nodes[0].port}"]
    svc = report["services"]["echo"]
    assert svc["checker"] in ("n1", "n2")
    ups = {u["id"]: u for u in svc["upstreams"]}
    assert ups["u1"]["marks"] == 3
    assert ups["u1"]["health"] == "SERVING"
    assert ups["u2"]["drain"] is True
    assert ups["u2"]["weight"] == 2
    table = etcd.pmlb("status")
    assert "service echo" in table
    assert "u1" in table
    for s in held:
        s.close()


def test_json_logs_one_object_per_line_without_payloads(cluster: Cluster) -> None:
    import socket

    u1 = cluster.echo("u1")
    node = cluster.node([f"u1={u1.addr}"], extra=["--log-format", "json"])
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"top-secret-payload\n")
        s.recv(100)
    # Our client's close (the fixture's readiness probe closes first, unbound).
    wait_until(lambda: "closed reason=client_closed upstream=u1" in node.proc.log(), 10, "close")
    lines = [json.loads(line) for line in node.proc.log().splitlines() if line.strip()]
    events = [r["msg"] for r in lines if r["logger"] == "pmlb.plane" and "mark=" in r["msg"]]
    assert any("accepted" in m for m in events)
    assert any("closed reason=client_closed" in m for m in events)
    # The fields operators query are keys of their own, not only in the message.
    closed = next(r for r in lines if "closed reason=client_closed upstream=u1" in r["msg"])
    assert closed["reason"] == "client_closed"
    assert closed["upstream"] == "u1"
    assert closed["mark"].startswith("n1.")
    assert closed["client"].startswith("127.0.0.1:")
    assert closed["node"] == "node/n1"
    accepted = [r for r in lines if r["msg"].endswith(" accepted")]
    assert closed["mark"] in [r["mark"] for r in accepted]
    # Prometheus conventions: build info, process metrics, histograms in seconds.
    m = node.metrics()
    assert [k for k in m if k.startswith("pmlb_build_info{")]
    assert m["process_open_fds"] > 0
    assert m["pmlb_connection_duration_seconds_count"] >= 1
    assert m['pmlb_connection_duration_seconds_bucket{le="+Inf"}'] >= 1
    assert m["pmlb_upstream_ack_latency_seconds_count"] >= 1
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in lines)
    assert "top-secret-payload" not in node.proc.log()


def _readme_metric_names() -> set[str]:
    """Every ``pmlb_*`` metric README's Observability section names, with
    ``{a,b}`` alternatives expanded and ``{label}`` sets dropped."""
    import re

    from tests.support import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Observability") : text.index("## Operations")]
    names: set[str] = set()
    for raw in re.findall(r"`(pmlb_[a-z_{},|=\"]+)", section):
        # "_{a,b}" are alternatives (pmlb_{in,out}_bytes_total); "name{...}"
        # after a letter is a label set (pmlb_build_info{version,python}).
        base = re.sub(r"(?<=[a-z])\{[^}]*\}$", "", raw)
        m = re.search(r"_\{([a-z_,]+)\}", base)
        if m is None:
            names.add(base)
        else:
            names |= {base.replace(m.group(0), "_" + alt) for alt in m.group(1).split(",")}
    return names


def test_every_metric_readme_names_is_on_a_node_with_a_checker(
    etcd: Etcd, cluster: Cluster
) -> None:
    """README's metric list against what /metrics serves (a node with etcd,
    holding the checker key, with traffic): a name that drifts fails here."""
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    node = cluster.node([], etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
    wait_until(lambda: etcd.get("/services/echo/health/u1"), 10, "the checker wrote health")
    import socket

    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(b"hi\n")
        assert s.recv(100).endswith(b" u1 hi\n")
    _, body = http_get(f"http://127.0.0.1:{node.admin}/metrics")
    served = set()
    for family in text_string_to_metric_families(
        body.decode() if isinstance(body, bytes) else body
    ):
        served.add(family.name)
        served |= {s.name for s in family.samples}
    named = _readme_metric_names()
    assert len(named) >= 25, sorted(named)
    assert sorted(n for n in named if n not in served) == []
