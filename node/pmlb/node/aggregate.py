"""The admin address of a node of several workers, served by its supervisor.

Prometheus, the dashboards and operators see one node (one target, one page),
as they do for HAProxy or Envoy; this module asks every worker (its internal
admin endpoint, HTTP on a Unix socket in the node's run directory) and answers
for all of them:

* ``/metrics``: every worker's samples merged, plus the supervisor's own
  ``process_*``. Counters and histograms are summed; gauges are summed unless
  summing means nothing (``metrics.GAUGE_MIN``/``metrics.GAUGE_MAX``: a link is up only if it
  is up on every worker; the checker flag is 1 if any worker is the checker).
  A ``worker`` label appears only on the few per-worker series
  (``pmlb_worker_up``, ``pmlb_worker_restarts_total``, ``pmlb_worker_marks_open``).
* ``/connections`` pages through worker 0, then 1, ...; ``after`` names a mark,
  and a mark names its worker.
* ``/api/mark`` and ``/api/mark/close`` go to the worker the mark names.
* ``/api/status`` sums the workers' figures and lists them.
* ``/drain`` drains the whole node (the supervisor's stop).

Every request to a worker is bounded in time and size; a worker that does not
answer costs only its own part (its series are missing from /metrics, its
marks from /connections) and is reported as such.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from pmlb import __version__
from pmlb.dataplane.siblings import admin_socket
from pmlb.observability import metrics
from pmlb.observability.admin import AdminServer, json_body
from pmlb.observability.dashboard import add_page_routes
from pmlb.protocol.domain import format_hostport
from pmlb.protocol.ids import worker_of

if TYPE_CHECKING:
    from pmlb.config import NodeConfig


# What this module reads of the supervisor (pmlb.node.workers), declared here
# so that the two do not import each other.
class WorkerView(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def up(self) -> bool: ...
    @property
    def restarts(self) -> int: ...


class SessionView(Protocol):
    @property
    def lease(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


class Supervisor(Protocol):
    @property
    def config(self) -> NodeConfig: ...
    @property
    def rundir(self) -> str: ...
    @property
    def session(self) -> SessionView | None: ...
    @property
    def started_at(self) -> str: ...
    @property
    def started_unix(self) -> float: ...
    @property
    def stop_event(self) -> asyncio.Event | None: ...
    @property
    def workers(self) -> Sequence[WorkerView]: ...


log = logging.getLogger("pmlb.aggregate")

WORKER_TIMEOUT: Final = 5.0
MAX_WORKER_BODY: Final = 64 << 20


async def fetch(path: str, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request to a worker's admin socket: (status, body)."""
    async with asyncio.timeout(WORKER_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 16)
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            body = await reader.read(MAX_WORKER_BODY + 1)
            while len(body) <= MAX_WORKER_BODY:
                more = await reader.read(MAX_WORKER_BODY + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > MAX_WORKER_BODY:
                raise ValueError(f"answer over {MAX_WORKER_BODY} bytes")
            return status, body
        finally:
            writer.close()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def merge_metrics(texts: Iterable[str]) -> bytes:
    """The Prometheus text of several processes of one node, as one."""
    families: dict[str, tuple[str, str, dict[tuple[str, str], list[float]]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            kind = fam.type
            name = fam.name + ("_total" if kind == "counter" else "")
            entry = families.setdefault(name, (kind, fam.documentation, {}))
            for sample in fam.samples:
                if sample.name.endswith("_created"):
                    continue  # when each process created it: no node-wide meaning
                key = (sample.name, _labels(sample.labels))
                entry[2].setdefault(key, []).append(sample.value)
    out: list[str] = []
    for name, (kind, doc, samples) in families.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        reduce: Callable[[list[float]], float] = math.fsum
        if kind == "gauge" and base in metrics.GAUGE_MIN:
            reduce = min
        elif kind == "gauge" and base in metrics.GAUGE_MAX:
            reduce = max
        text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
        for (series, labels), values in samples.items():
            out.append(f"{series}{labels} {_number(reduce(values))}\n")
    return "".join(out).encode()


class NodeAdmin:
    """The routes of the node's admin address, answered from every worker."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.failed_asks = 0
        self._own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._own)  # the supervisor's own process

    def _path(self, index: int) -> str:
        return admin_socket(self.sup.rundir, index)

    async def ask(self, index: int, method: str, target: str) -> tuple[int, bytes] | None:
        """A worker's answer, or None when it gave none (counted, logged)."""
        try:
            return await fetch(self._path(index), method, target)
        except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            self.failed_asks += 1
            log.warning("worker %d did not answer %s %s: %r", index, method, target, exc)
            return None

    async def ask_all(self, target: str) -> list[tuple[int, bytes] | None]:
        return list(
            await asyncio.gather(*(self.ask(w.index, "GET", target) for w in self.sup.workers))
        )

    async def ask_json(self, index: int, target: str) -> dict[str, Any] | None:
        answer = await self.ask(index, "GET", target)
        if answer is None or answer[0] != 200:
            return None
        try:
            obj = json.loads(answer[1])
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    # -- routes ----------------------------------------------------------------

    async def healthz(self, query: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    async def readyz(self, query: str) -> tuple[int, str, bytes]:
        answers = await self.ask_all("/readyz")
        session = self.sup.session
        registered = session is None or bool(session.lease)
        stopping = self.sup.stop_event is not None and self.sup.stop_event.is_set()
        ready = registered and not stopping and all(a is not None and a[0] == 200 for a in answers)
        return (200 if ready else 503), "text/plain", b"ready\n" if ready else b"not ready\n"

    def _own_metrics(self) -> str:
        workers = (metrics.WorkerSample(w.index, w.up, w.restarts) for w in self.sup.workers)
        own = metrics.supervisor_text(workers, self.failed_asks)
        return own + generate_latest(self._own).decode()

    async def metrics(self, query: str) -> tuple[int, str, bytes]:
        answers = await self.ask_all("/metrics")
        texts = [self._own_metrics()]
        per_worker: list[tuple[int, str]] = []
        for w, answer in zip(self.sup.workers, answers, strict=True):
            if answer is None or answer[0] != 200:
                continue
            text = answer[1].decode("utf-8", "replace")
            texts.append(text)
            for fam in text_string_to_metric_families(text):
                if fam.name == metrics.MARKS_OPEN:
                    value = fam.samples[0].value if fam.samples else 0.0
                    per_worker.append((w.index, _number(value)))
        texts.append(metrics.worker_marks_text(per_worker))
        try:
            body = merge_metrics(texts)
        except ValueError as exc:  # a worker's text did not parse: say so, keep serving
            log.warning("could not merge the workers' metrics: %s", exc)
            return 500, "text/plain", b"could not merge the workers' metrics\n"
        return 200, metrics.CONTENT_TYPE, body

    async def connections(self, query: str) -> tuple[int, str, bytes]:
        q = urllib.parse.parse_qs(query)
        limit = min(int(q.get("limit", ["100"])[0] or 100), 1000)
        after = q.get("after", [""])[0]
        first = worker_of(after) if after else 0
        first = first if first is not None and first < len(self.sup.workers) else 0
        marks: list[Any] = []
        total = 0
        more = False
        for w in self.sup.workers:
            params = {k: v[0] for k, v in q.items() if k in ("upstream", "client")}
            wanted = limit - len(marks) if w.index >= first else 0
            params["limit"] = str(max(1, wanted))
            if w.index == first and after:
                params["after"] = after
            page = await self.ask_json(w.index, "/connections?" + urllib.parse.urlencode(params))
            if page is None:
                continue
            total += int(page.get("total", 0))
            if wanted <= 0:
                more = more or (w.index > first and bool(page.get("marks")))
                continue
            got = list(page.get("marks", []))[:wanted]
            marks.extend(got)
            if page.get("next"):
                more = True
        body = {"marks": marks, "total": total, "next": marks[-1]["mark"] if more and marks else ""}
        return 200, "application/json", json_body(body)

    async def _to_owner(self, method: str, path: str, query: str) -> tuple[int, str, bytes]:
        mark = urllib.parse.parse_qs(query).get("mark", [""])[0]
        worker = worker_of(mark)
        if worker is None or worker >= len(self.sup.workers):
            error = {"error": f"no mark {mark!r} on this node"}
            return 404, "application/json", json_body(error)
        answer = await self.ask(worker, method, path + "?" + query)
        if answer is None:
            error = {"error": f"worker {worker}, which holds {mark!r}, did not answer"}
            return 502, "application/json", json_body(error)
        return answer[0], "application/json", answer[1]

    async def mark(self, query: str) -> tuple[int, str, bytes]:
        return await self._to_owner("GET", "/api/mark", query)

    async def close_mark(self, query: str) -> tuple[int, str, bytes]:
        return await self._to_owner("POST", "/api/mark/close", query)

    async def drain(self, query: str) -> tuple[int, str, bytes]:
        # Same as SIGTERM: leave etcd, stop accepting, drain every worker, exit 0.
        if self.sup.stop_event is not None:
            self.sup.stop_event.set()
        return 200, "text/plain", b"draining\n"

    async def status(self, query: str) -> tuple[int, str, bytes]:
        sup = self.sup
        cfg = sup.config
        answers = await asyncio.gather(
            *(self.ask_json(w.index, "/api/status") for w in sup.workers)
        )
        got = [a for a in answers if a is not None]
        nodes = [a.get("node", {}) for a in got]
        upstreams: dict[str, dict[str, Any]] = {}
        for a in got:
            for u in a.get("upstreams", []):
                merged = upstreams.get(u["id"])
                if merged is None:
                    upstreams[u["id"]] = dict(u)
                    continue
                for k in ("marks", "frames_sent", "failovers"):
                    merged[k] = merged.get(k, 0) + u.get(k, 0)
                merged["routable"] = merged.get("routable") and u.get("routable")
                for state in ("down", "connecting"):  # the worst link state shows
                    if state in (merged.get("link"), u.get("link")):
                        merged["link"] = state
                        break
        stopping = sup.stop_event is not None and sup.stop_event.is_set()
        session = sup.session
        body = {
            "node": {
                "id": cfg.node_id,
                "version": __version__,
                "service": cfg.service,
                "listen": [format_hostport(h, p) for h, p in cfg.listen],
                "started_at": sup.started_at,
                "uptime_s": round(time.time() - sup.started_unix, 1),
                "draining": stopping or any(n.get("draining") for n in nodes),
                "marks_open": sum(int(n.get("marks_open", 0)) for n in nodes),
                "accepted_total": sum(int(n.get("accepted_total", 0)) for n in nodes),
                "etcd_session_up": bool(session and session.healthy),
                "pid": os.getpid(),
                "handover": merge_handover([n.get("handover") for n in nodes]),
                "checker": next((n["checker"] for n in nodes if n.get("checker")), ""),
                "workers": [
                    {
                        "index": w.index,
                        "pid": w.pid,
                        "up": w.up,
                        "restarts": w.restarts,
                        "marks_open": next(
                            (
                                int(a.get("node", {}).get("marks_open", 0))
                                for a in got
                                if a.get("node", {}).get("worker") == w.index
                            ),
                            None,
                        ),
                    }
                    for w in sup.workers
                ],
            },
            "upstreams": sorted(upstreams.values(), key=lambda u: str(u["id"])),
            "trace_url": cfg.trace_url or "",
            "now_unix_ms": int(time.time() * 1000),
        }
        return 200, "application/json", json_body(body)


def node_admin(supervisor: Supervisor) -> AdminServer:
    """The admin server of the node (--admin), answering for every worker."""
    cfg = supervisor.config
    assert cfg.admin is not None
    admin = AdminServer(
        *cfg.admin,
        token=cfg.admin_token,
        names=[cfg.advertise] if cfg.advertise else (),
    )
    node = NodeAdmin(supervisor)
    admin.route("GET", "/healthz", node.healthz)
    admin.route("GET", "/readyz", node.readyz)
    admin.route("GET", "/metrics", node.metrics)
    add_page_routes(admin, "dashboard.html")
    admin.route("GET", "/api/status", node.status)
    admin.route("GET", "/connections", node.connections, protected=True)
    admin.route("GET", "/api/mark", node.mark, protected=True)
    admin.route("POST", "/api/mark/close", node.close_mark, protected=True)
    admin.route("POST", "/drain", node.drain, protected=True)
    return admin


# The node's handover state is its workers' least settled one.
_HANDOVER_ORDER: Final = ("giving", "taking", "failed", "given", "taken", "none")


def merge_handover(parts: Iterable[object]) -> dict[str, Any]:
    """The workers' handover figures as the node's: marks summed, the
    longest pause, the least settled state, the first error."""
    got = [p for p in parts if isinstance(p, dict)]
    states = [str(p.get("state", "none")) for p in got]
    out: dict[str, Any] = {
        "state": min(states, key=lambda s: _HANDOVER_ORDER.index(s) if s in _HANDOVER_ORDER else 0)
        if states
        else "none",
        "last_error": next((str(p["last_error"]) for p in got if p.get("last_error")), ""),
    }
    for key in ("marks_out", "marks_in", "kept", "failed"):
        out[key] = sum(int(p.get(key, 0)) for p in got)
    for key in ("last_seconds", "pause_max_ms", "transfer_seconds"):
        out[key] = max((float(p.get(key, 0)) for p in got), default=0.0)
    moved = out["marks_in"]
    out["pause_mean_ms"] = (
        round(
            sum(float(p.get("pause_mean_ms", 0)) * int(p.get("marks_in", 0)) for p in got) / moved,
            1,
        )
        if moved
        else 0.0
    )
    return out
