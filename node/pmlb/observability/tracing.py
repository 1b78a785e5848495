"""One OpenTelemetry trace per mark, exported by OTLP (to Jaeger, say).

Off unless configured: ``--otlp-endpoint`` or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
variables (``OTEL_SDK_DISABLED=true`` turns it off again). The standard
variables are honoured as the OpenTelemetry spec has them: the protocol
(``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``grpc``, the default, or
``http/protobuf``), ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
(over the default service name, ``pmlb-node`` for a node). Spans go through a
BatchSpanProcessor, whose queue is bounded and whose export runs in its own
thread, so tracing never blocks the data path; when the queue is full spans
are dropped, never waited for.

Shape of a mark's trace:

* ``pmlb.connection`` (root, SERVER): from accept to close. Attributes: the
  mark, client address and port, service, node id, the upstreams it was bound
  to, bytes and frames each way, the close reason.
* ``pmlb.accept``, ``pmlb.bind``, ``pmlb.failover``, ``pmlb.move``,
  ``pmlb.drain``, ``pmlb.replay_overflow``: short child spans ended at once.
  Jaeger shows a span only once it has ended, so these make an open mark's
  trace visible within a batch delay of its accept, long before the root ends.

The root's W3C trace context rides in Open.trace_context, so upstream spans
(the SDK's, and any the handlers make) join the same trace.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pmlb.errors import ConfigError

log = logging.getLogger("pmlb.tracing")


def _configured(endpoint: str | None) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def make_provider(service_name: str, instance_id: str, endpoint: str | None) -> Any:
    """An SDK TracerProvider exporting by OTLP/gRPC, or None when not configured."""
    if not _configured(endpoint):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.instance.id": instance_id}
    # Explicit attributes win over the environment's in Resource.create: the
    # default name goes in only when the operator named none.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attributes["service.name"] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    kwargs: dict[str, Any] = {}
    if protocol == "grpc":
        if endpoint:
            kwargs["endpoint"] = endpoint
            kwargs["insecure"] = not endpoint.startswith("https://")
        exporter: Any = OTLPSpanExporter(**kwargs)
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        if endpoint:  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is
            kwargs["endpoint"] = endpoint.rstrip("/") + "/v1/traces"
        exporter = HTTPSpanExporter(**kwargs)
    else:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: pmlb exports 'grpc' or 'http/protobuf'"
        )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info(
        "tracing on: OTLP (%s) to %s",
        protocol,
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    return provider


class ConnTracer:
    """The node's tracer; every method is a no-op when tracing is off."""

    def __init__(self, node_id: str, service: str, endpoint: str | None) -> None:
        self.node_id = node_id
        self.service = service
        self.provider = make_provider("pmlb-node", node_id, endpoint)
        self.enabled = self.provider is not None
        if self.enabled:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._trace = trace
            self._tracer = self.provider.get_tracer("pmlb.node")
            self._propagator = TraceContextTextMapPropagator()

    def start(self, conn: Any) -> Any:
        """The root span of a new connection (and an immediately ended accept span)."""
        span = self._tracer.start_span(
            "pmlb.connection", kind=self._trace.SpanKind.SERVER, attributes=self._root(conn)
        )
        self.child(span, "pmlb.accept", {"pmlb.mark": conn.mark})
        return span

    def _root(self, conn: Any) -> dict[str, Any]:
        """The attributes of a connection's root span."""
        return {
            "pmlb.mark": conn.mark,
            "pmlb.service": self.service,
            "pmlb.node_id": self.node_id,
            "client.address": conn.client_addr,
            "client.port": conn.client_port,
        }

    def resume(self, conn: Any, carrier: dict[str, str]) -> Any:
        """The root span of a connection the node's previous process handed
        over: a new span in the same trace, a child of the old process's."""
        span = self._tracer.start_span(
            "pmlb.connection",
            context=self._propagator.extract(carrier),
            kind=self._trace.SpanKind.SERVER,
            attributes={**self._root(conn), "pmlb.handed_over": True},
        )
        self.child(span, "pmlb.taken_over", {"pmlb.mark": conn.mark})
        return span

    def child(self, span: Any, name: str, attributes: dict[str, Any]) -> None:
        if span is None:
            return
        ctx = self._trace.set_span_in_context(span)
        self._tracer.start_span(name, context=ctx, attributes=attributes).end()
        span.add_event(name, attributes)

    @staticmethod
    def trace_id(span: Any) -> str:
        """The span's trace id in hex (what Jaeger shows), "" without tracing."""
        if span is None:
            return ""
        return f"{span.get_span_context().trace_id:032x}"

    def carrier(self, span: Any) -> dict[str, str]:
        """W3C trace context of ``span``, for Open.trace_context."""
        out: dict[str, str] = {}
        if span is not None:
            self._propagator.inject(out, context=self._trace.set_span_in_context(span))
        return out

    def end(self, conn: Any, upstreams: list[str]) -> None:
        span = conn.span
        if span is None:
            return
        span.set_attributes(
            {
                "pmlb.upstreams": upstreams,
                "pmlb.close_reason": conn.close_reason or "client_closed",
                "pmlb.bytes_in": conn.bytes_in,
                "pmlb.bytes_out": conn.bytes_out,
                "pmlb.frames_in": conn.frames_in,
                "pmlb.frames_out": conn.frames_out,
                "pmlb.binds": conn.binds,
            }
        )
        if conn.close_reason not in ("", "client_closed", "upstream_closed"):
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, conn.close_reason))
        span.end()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is queued (bounded by its timeout)
