"""A node's admin HTTP endpoints: health, readiness, metrics, marks, drain.

Open: /healthz, /readyz, /metrics, /api/status and the dashboard page (no
client addresses or metadata). Behind the admin token (or a loopback admin
address): /connections, /api/mark, /api/mark/close and POST /drain. The
server itself (bounds, the token rule) is observability.admin; a node of
several workers answers for all of them through node.aggregate.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from typing import TYPE_CHECKING, Protocol

from pmlb import __version__
from pmlb.observability import metrics
from pmlb.observability.admin import AdminServer, json_body
from pmlb.observability.dashboard import add_page_routes
from pmlb.protocol import reasons
from pmlb.protocol.domain import format_hostport

if TYPE_CHECKING:
    from pmlb.cluster.membership import Membership
    from pmlb.config import NodeConfig
    from pmlb.dataplane.plane import DataPlane
    from pmlb.node.workers import WorkerRole
    from pmlb.observability.stats import NodeStats

log = logging.getLogger("pmlb.app")


class NodeView(Protocol):
    """What the endpoints read of the node (node.app.NodeApp)."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def plane(self) -> DataPlane: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def membership(self) -> Membership: ...
    @property
    def role(self) -> WorkerRole | None: ...
    @property
    def started_at(self) -> str: ...
    def draining(self) -> bool: ...
    def request_stop(self) -> None: ...
    def node_sample(self) -> metrics.NodeSample: ...


Reply = tuple[int, str, bytes]


def add_node_routes(admin: AdminServer, app: NodeView) -> None:
    """A node's admin endpoints (a worker's, when the node has several)."""
    routes = NodeRoutes(app)
    admin.route("GET", "/healthz", routes.healthz)
    admin.route("GET", "/readyz", routes.readyz)
    admin.route("GET", "/metrics", routes.metrics)
    add_page_routes(admin, "dashboard.html")
    admin.route("GET", "/api/status", routes.status)
    # Client addresses and metadata, and actions: behind the admin token.
    admin.route("GET", "/connections", routes.connections, protected=True)
    admin.route("GET", "/api/mark", routes.mark, protected=True)
    admin.route("POST", "/api/mark/close", routes.close_mark, protected=True)
    admin.route("POST", "/drain", routes.drain, protected=True)


class NodeRoutes:
    """One handler per endpoint; each takes the query string."""

    def __init__(self, app: NodeView) -> None:
        self.app = app
        self.plane = app.plane
        self._routable_ids: set[str] = set()
        self.registry = metrics.make_registry(
            metrics.NodeCollector(
                app.stats, self._link_samples, app.node_sample, app.plane.handover_stats
            )
        )

    async def healthz(self, query: str) -> Reply:
        return 200, "text/plain", b"ok\n"

    async def readyz(self, query: str) -> Reply:
        app, plane = self.app, self.plane
        registered = app.membership.registered
        ready = plane.accepting and registered and not app.draining() and bool(plane.routable())
        return (200 if ready else 503), "text/plain", b"ready\n" if ready else b"not ready\n"

    def _link_samples(self) -> list[metrics.LinkSample]:
        routable_ids = self._routable_ids
        routable_ids.clear()
        routable_ids.update(lk.id for lk in self.plane.routable())
        return [
            metrics.LinkSample(
                upstream=lk.id,
                state=lk.state,
                marks=lk.load,
                routable=lk.id in routable_ids,
                health=lk.spec.health,
                draining=lk.spec.drain,
                batches_sent=lk.batches_sent + lk.writer.batches_sent,
                frames_sent=lk.frames_sent + lk.writer.frames_sent,
                full_flushes=lk.full_flushes + lk.writer.cuts,
                failed_over=lk.failed_over,
            )
            for lk in self.plane.links.values()
        ]

    async def metrics(self, query: str) -> Reply:
        return 200, metrics.CONTENT_TYPE, metrics.render(self.registry)

    async def connections(self, query: str) -> Reply:
        # ?limit=N (<= 1000) &after=MARK &upstream=ID &client=ADDR
        q = urllib.parse.parse_qs(query)
        limit = min(int(q.get("limit", ["100"])[0] or 100), 1000)
        after = q.get("after", [""])[0]
        upstream = q.get("upstream", [""])[0]
        client = q.get("client", [""])[0]
        keys = list(self.plane.marks)
        start = keys.index(after) + 1 if after in self.plane.marks else 0
        page: list[dict[str, object]] = []
        i = start
        while i < len(keys) and len(page) < limit:
            conn = self.plane.marks.get(keys[i])
            i += 1
            if conn is None:
                continue
            if upstream and (conn.route is None or conn.route.id != upstream):
                continue
            if client and conn.client_addr != client:
                continue
            page.append(conn.describe())
        body = {
            "marks": page,
            "total": len(keys),
            "next": page[-1]["mark"] if page and i < len(keys) else "",
        }
        return 200, "application/json", json_body(body)

    async def drain(self, query: str) -> Reply:
        # Same as SIGTERM: leave etcd, stop accepting, drain, exit 0.
        self.app.request_stop()
        return 200, "text/plain", b"draining\n"

    async def status(self, query: str) -> Reply:
        # What the dashboard shows of the node and its upstreams: no client
        # addresses or metadata, so it is open like /metrics.
        cfg = self.app.config
        draining = self.app.draining()
        routable = {lk.id for lk in self.plane.routable()}
        body = {
            "node": {
                "id": cfg.node_id,
                "version": __version__,
                "service": cfg.service,
                "listen": [format_hostport(h, p) for h, p in self.plane.bound_addresses],
                "started_at": self.app.started_at,
                "uptime_s": round(time.time() - self.plane.started_at, 1),
                "draining": draining or not self.plane.accepting,
                "marks_open": len(self.plane.marks),
                "accepted_total": self.app.stats.accepted,
                "etcd_session_up": self.app.membership.session_up,
                "checker": self.app.membership.checker_id,
                "worker": self.app.role.index if self.app.role is not None else None,
                "pid": os.getpid(),
                "handover": self.plane.handover_stats.describe(),
            },
            "upstreams": [
                {
                    "id": lk.id,
                    "addr": lk.spec.addr,
                    "weight": lk.spec.weight,
                    "drain": lk.spec.drain,
                    "health": lk.spec.health,
                    "link": lk.state,
                    "routable": lk.id in routable,
                    "marks": lk.load,
                    "frames_sent": lk.frames_sent + lk.writer.frames_sent,
                    "failovers": lk.failed_over,
                }
                for lk in self.plane.links.values()
            ],
            "trace_url": cfg.trace_url or "",
            "now_unix_ms": int(time.time() * 1000),
        }
        return 200, "application/json", json_body(body)

    async def mark(self, query: str) -> Reply:
        # ?mark=M: an open mark, or one closed recently (with its reason).
        m = urllib.parse.parse_qs(query).get("mark", [""])[0]
        conn = self.plane.marks.get(m)
        if conn is not None:
            found = conn.describe()
            found["trace_id"] = self.plane.tracer.trace_id(conn.span) or ""
            found["node"] = self.app.config.node_id
            return 200, "application/json", json_body(found)
        closed = self.plane.recently_closed.get(m)
        if closed is not None:
            return 200, "application/json", json_body({**closed, "node": self.app.config.node_id})
        return 404, "application/json", json_body({"error": f"no mark {m!r} on this node"})

    async def close_mark(self, query: str) -> Reply:
        # ?mark=M: close it, reason closed_by_api (the upstream gets a Close).
        m = urllib.parse.parse_qs(query).get("mark", [""])[0]
        conn = self.plane.marks.get(m)
        if conn is None:
            return 404, "application/json", json_body({"error": f"no open mark {m!r}"})
        log.info("mark=%s closed from the admin endpoint", m)
        conn.close(reasons.CLOSED_BY_API, "closed from the admin endpoint", notify=True)
        return 200, "application/json", json_body({"closed": m})
