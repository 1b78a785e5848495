"""``pmlb dashboard --etcd URLS``: the whole cluster on one page.

A small process of its own (any machine that reaches etcd and the nodes' admin
endpoints) serving ``cluster.html`` and three JSON endpoints over the same tiny
admin HTTP server the nodes use:

* ``GET /api/cluster`` (open, polled by the page): nodes as registered in etcd
  with what their admin endpoints report (reachable, marks, age), and per
  service the checker and the upstreams (address, weight, drain, health, marks
  summed over nodes): what ``pmlb status`` prints;
* ``GET /api/mark?mark=M`` (token): asks the node that owns the mark (its id
  is in the mark) for it, with the same admin token the nodes use, and only
  if that node's key is a live registration (see ``ask_owner``);
* ``POST /api/upstream?service=S&id=U&drain=1|0`` (token): sets or clears the
  upstream's drain flag in etcd, as ``pmlb upstream drain|undrain`` does.

The token rule is the nodes' (loopback without ``--admin-token``, the token
beyond it). Each node's own page (its admin address, linked from here) shows
its live numbers and marks in detail.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import urllib.parse
from typing import TYPE_CHECKING

from pmlb.commands.admin import cluster_status, set_drain
from pmlb.config import ETCD_OPTIONS, Option, add_options, resolve
from pmlb.errors import InvalidMark, PmlbError
from pmlb.observability import scrape
from pmlb.observability.admin import AdminServer, json_body
from pmlb.observability.dashboard import add_page_routes
from pmlb.protocol.ids import node_of
from pmlb.store.keys import InvalidValue, Keys, load_json, parse_node

if TYPE_CHECKING:  # the etcd client is imported when the command runs (node extra)
    from pmlb.store.etcd import EtcdStore

log = logging.getLogger("pmlb.dashboard")

DASHBOARD_OPTIONS: tuple[Option, ...] = (
    *ETCD_OPTIONS,
    Option("listen", "HTTP HOST:PORT to serve the page on", "127.0.0.1:9300"),
    Option(
        "admin-token",
        "token for marks and actions here, and sent to the nodes' admin endpoints "
        "(the nodes' --admin-token; prefer PMLB_ADMIN_TOKEN)",
    ),
    Option("trace-url", "trace link template with {trace_id} (e.g. Jaeger's /trace/{trace_id})"),
    Option("dns-prefix", "etcd prefix of the DNS records the nodes publish", "/skydns"),
    Option("log-level", "debug, info, warning or error", "info"),
)
NODE_TIMEOUT = 2.0


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dashboard", help="the whole cluster on one page, from etcd and the nodes")
    add_options(p, DASHBOARD_OPTIONS)


def run_dashboard(args: argparse.Namespace) -> int:
    from pmlb import aio
    from pmlb.observability.logs import setup_logging
    from pmlb.protocol.domain import parse_hostport
    from pmlb.store.etcd import EtcdStore, settings_from

    values = resolve(DASHBOARD_OPTIONS, args)
    setup_logging(values["log_level"], "text", "dashboard")
    host, port = parse_hostport(values["listen"], "--listen")
    token = values["admin_token"]

    async def main(stop: asyncio.Event) -> int:
        store = EtcdStore(settings_from(values))
        keys = Keys(values["etcd_prefix"])
        await store.connect()
        admin = AdminServer(host, port, token)

        async def cluster(query: str) -> tuple[int, str, bytes]:
            try:
                report = await cluster_status(store, keys)
            except PmlbError as exc:
                return 503, "application/json", json_body({"error": str(exc)})
            report["trace_url"] = values["trace_url"] or ""
            report["dns"] = await dns_records(store, values["dns_prefix"])
            return 200, "application/json", json_body(report)

        async def mark(query: str) -> tuple[int, str, bytes]:
            m = urllib.parse.parse_qs(query).get("mark", [""])[0]
            try:
                owner = node_of(m)
            except InvalidMark as exc:
                return 400, "application/json", json_body({"error": str(exc)})
            status, body = await ask_owner(store, keys, owner, m, token)
            return status, "application/json", body

        async def upstream(query: str) -> tuple[int, str, bytes]:
            q = urllib.parse.parse_qs(query)
            service, uid = q.get("service", [""])[0], q.get("id", [""])[0]
            drain = q.get("drain", ["1"])[0] == "1"
            try:
                value = await set_drain(store, keys, service, uid, drain)
            except PmlbError as exc:
                return 404, "application/json", json_body({"error": str(exc)})
            log.info(
                "upstream %s of %s %s from the dashboard",
                uid,
                service,
                "drained" if drain else "undrained",
            )
            return (
                200,
                "application/json",
                json_body({"service": service, "id": uid, "value": value}),
            )

        add_page_routes(admin, "cluster.html")
        admin.route("GET", "/api/cluster", cluster)
        admin.route("GET", "/api/mark", mark, protected=True)
        admin.route("POST", "/api/upstream", upstream, protected=True)
        await admin.start()
        print(f"pmlb dashboard on http://{host}:{admin.port}/", flush=True)
        await stop.wait()
        await admin.stop()
        await store.close()
        return 0

    return aio.run(main)


async def dns_records(store: EtcdStore, prefix: str) -> list[dict[str, str]]:
    """The DNS records nodes publish (CoreDNS etcd plugin keys): name and address."""
    prefix = prefix.rstrip("/")
    try:
        _, kvs = await store.get_prefix(prefix + "/")
    except PmlbError:
        return []
    out = []
    for kv in kvs:
        labels = kv.key[len(prefix) + 1 :].split("/")
        try:
            value = load_json(kv.key, kv.value)
            host = str(value.get("host", "")) if isinstance(value, dict) else "?"
        except InvalidValue:
            host = "?"
        # /skydns/com/example/lb/<node id> -> lb.example.com, published by <node id>
        out.append({"name": ".".join(reversed(labels[:-1])), "node": labels[-1], "host": host})
    return out


async def ask_owner(
    store: EtcdStore, keys: Keys, owner: str, mark: str, token: str | None
) -> tuple[int, bytes]:
    """GET /api/mark from the node that owns ``mark``, with the admin token.

    The token goes only to the admin address of a live registration: the
    node's key, held by its session's lease (a key written without a lease,
    by hand or by someone else, is not a node). The request follows no
    redirect and is bounded in time and size (pmlb.observability.scrape), so
    neither the token nor the caller's wait can be carried elsewhere."""

    def error(status: int, text: str) -> tuple[int, bytes]:
        return status, json_body({"error": text})

    try:
        kv = await store.get(keys.node(owner))
    except PmlbError as exc:
        return error(503, f"cannot read node {owner} from etcd: {exc}")
    if kv is None:
        return error(404, f"node {owner} is not live")
    if kv.lease == 0:
        log.warning("not asking node %r: its key has no lease (not a live registration)", owner)
        return error(404, f"node {owner} is not a live registration (its key has no lease)")
    try:
        admin = str(parse_node(owner, kv.value).get("admin", ""))
    except InvalidValue as exc:
        return error(502, str(exc))
    if not admin:
        return error(404, f"node {owner} serves no admin endpoint")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        status, body = await scrape.get(
            admin, f"/api/mark?mark={urllib.parse.quote(mark)}", headers, timeout=NODE_TIMEOUT
        )
    except scrape.ScrapeError as exc:
        return error(502, f"node {owner} unreachable: {exc}")
    if 300 <= status < 400:
        log.warning("node %r answered %d for a mark; redirects are not followed", owner, status)
        return error(502, f"node {owner} answered {status}; redirects are not followed")
    return status, body
