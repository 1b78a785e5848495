"""The OpenTelemetry variables an operator sets are honoured (issue [17]): a
hard-coded service.name overrode OTEL_SERVICE_NAME, and
OTEL_EXPORTER_OTLP_PROTOCOL was ignored. Real receivers: OTLP/HTTP (what
Jaeger and collectors serve on 4318) and OTLP/gRPC (4317)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsg

from tests.conftest import Cluster
from tests.support import Proc, free_port, wait_until


class Spans:
    """What a receiver got: (service.name, span name, pmlb.mark) per span."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def add(self, request: Any) -> None:
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        attrs = {a.key: a.value.string_value for a in sp.attributes}
                        self.got.append(
                            (resource.get("service.name", ""), sp.name, attrs.get("pmlb.mark", ""))
                        )


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Spans]]:
    spans = Spans()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                spans.add(tsp.ExportTraceServiceRequest.FromString(body))
            out = tsp.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", spans
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Spans]]:
    spans = Spans()

    class Servicer(tsg.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            spans.add(request)
            return tsp.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    tsg.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", spans
    server.stop(0)


def _service_names(cluster: Cluster, spans: Spans, env: dict[str, str]) -> set[str]:
    """The service.name of every span of one client's mark, from a node
    started with ``env`` (spans batched every 100 ms)."""
    up = cluster.echo("u1")
    node = cluster.node([f"u1={up.addr}"], env={**env, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"hi\n")
        mark = s.recv(200).split()[0].decode()
    wait_until(lambda: any(m == mark for _, _, m in spans.got), 20, "the mark's spans")
    return {svc for svc, _, m in spans.got if m == mark}


def test_http_protobuf_and_otel_service_name(
    cluster: Cluster, http_receiver: tuple[str, Spans]
) -> None:
    endpoint, spans = http_receiver
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "edge-lb",
    }
    assert _service_names(cluster, spans, env) == {"edge-lb"}


def test_grpc_by_default_with_the_service_name_from_resource_attributes(
    cluster: Cluster, grpc_receiver: tuple[str, Spans]
) -> None:
    endpoint, spans = grpc_receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=edge-grpc,deployment.environment=test",
    }
    assert _service_names(cluster, spans, env) == {"edge-grpc"}


def test_without_a_name_the_node_is_pmlb_node(
    cluster: Cluster, grpc_receiver: tuple[str, Spans]
) -> None:
    endpoint, spans = grpc_receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    assert _service_names(cluster, spans, env) == {"pmlb-node"}


def test_an_unknown_protocol_is_refused_at_start(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    port = free_port()
    proc = Proc(
        "node-badproto",
        ["node", "--listen", f"127.0.0.1:{port}", "--upstream", f"u1={up.addr}"],
        cluster.log_dir,
        env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        },
    )
    cluster.procs.append(proc)
    assert proc.proc.wait(30) == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'" in proc.log()
