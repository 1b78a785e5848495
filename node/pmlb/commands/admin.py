"""``pmlb upstream add|rm|drain|undrain|ls``: operate the upstream keys in etcd.

The same keys an operator writes with etcdctl (see pmlb.store.keys); this is
only a friendlier, validating front end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pmlb.config import ETCD_OPTIONS, add_options, resolve
from pmlb.errors import ConfigError, PmlbError
from pmlb.protocol.domain import parse_hostport
from pmlb.store.keys import (
    UNKNOWN,
    InvalidValue,
    Keys,
    format_upstream,
    parse_health,
    parse_node,
    parse_upstream,
    valid_id,
)

if TYPE_CHECKING:  # the etcd client is imported when a command runs (node extra)
    from pmlb.store.etcd import KV, EtcdStore


def add_upstream_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("upstream", help="add, remove, drain or list upstreams in etcd")
    up.add_argument("action", choices=("add", "rm", "drain", "undrain", "ls"))
    up.add_argument("service")
    up.add_argument("id", nargs="?")
    up.add_argument("addr", nargs="?", metavar="HOST:PORT")
    up.add_argument(
        "--weight",
        type=int,
        default=1,
        help="add: share of new marks relative to the other upstreams (1-10000, default 1)",
    )
    up.add_argument(
        "--replace",
        action="store_true",
        help="add: overwrite an upstream of that id (its address, weight and drain flag)",
    )
    up.add_argument("--json", action="store_true", help="ls: print JSON")
    add_options(up, ETCD_OPTIONS)


def run_upstream(args: argparse.Namespace) -> int:
    if args.action in ("add", "rm", "drain", "undrain") and not args.id:
        raise ConfigError(f"upstream {args.action} needs an ID")
    if args.action in ("add", "rm", "drain", "undrain") and not valid_id(args.id):
        raise ConfigError(
            f"upstream id {args.id!r}: use 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or a digit"
        )
    if args.action == "add":
        if not args.addr:
            raise ConfigError("upstream add needs HOST:PORT")
        parse_hostport(args.addr, "upstream address")
        if not 1 <= args.weight <= 10_000:
            raise ConfigError(f"--weight {args.weight}: use 1-10000")
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    store, keys = _store(args)
    await store.connect()
    try:
        key = keys.upstream(args.service, args.id) if args.id else ""
        if args.action == "add":
            from pmlb.protocol.domain import UpstreamSpec

            spec = UpstreamSpec(id=args.id, addr=args.addr, weight=args.weight)
            value = format_upstream(spec)
            if args.replace:
                await store.put(key, value)
            elif not await store.put_if_absent(key, value, 0):
                # Atomic (an etcd transaction): two operators adding the same
                # id cannot both think they did.
                old = await store.get(key)
                was = old.value.decode(errors="replace") if old else "?"
                raise PmlbError(
                    f"upstream {args.id} of service {args.service} exists ({_printable(was)}): "
                    "add --replace to overwrite it"
                )
            print(f"{key} = {value}")
        elif args.action == "rm":
            if not await store.delete(key):
                raise PmlbError(f"no upstream {args.id} in service {args.service}")
            print(f"removed {key}")
        elif args.action in ("drain", "undrain"):
            value = await set_drain(store, keys, args.service, args.id, args.action == "drain")
            print(f"{key} = {value}")
        else:
            await _ls(store, keys, args)
    finally:
        await store.close()
    return 0


async def _ls(store: EtcdStore, keys: Keys, args: argparse.Namespace) -> None:
    _, kvs = await store.get_prefix(keys.service(args.service))
    up_prefix, h_prefix = keys.upstreams(args.service), keys.healths(args.service)
    checker = next(
        (kv.value.decode(errors="replace") for kv in kvs if kv.key == keys.checker(args.service)),
        "",
    )
    health = {}
    rows = []
    for kv in kvs:
        try:
            if kv.key.startswith(h_prefix):
                uid = Keys.leaf(h_prefix, kv.key)
                health[uid] = parse_health(uid, kv.value)
        except InvalidValue:
            continue
    for kv in kvs:
        if not kv.key.startswith(up_prefix):
            continue
        try:
            uid = Keys.leaf(up_prefix, kv.key)
            spec = parse_upstream(uid, kv.value)
            h = health.get(uid)
            rows.append(
                {
                    "id": uid,
                    "addr": spec.addr,
                    "weight": spec.weight,
                    "drain": spec.drain,
                    "health": h.status if h else UNKNOWN,
                    "since": h.since if h else "",
                }
            )
        except InvalidValue as exc:
            rows.append(
                {
                    "id": kv.key[len(up_prefix) :],
                    "addr": "",
                    "weight": 0,
                    "drain": False,
                    "health": "MALFORMED",
                    "since": str(exc),
                }
            )
    if args.json:
        print(
            json.dumps({"service": args.service, "checker": checker, "upstreams": rows}, indent=1)
        )
        return
    print(f"service {_printable(args.service)}   checker: {_printable(checker or '-')}")
    print(f"{'ID':<16} {'ADDRESS':<24} {'WEIGHT':>6}  {'DRAIN':<5}  HEALTH")
    for r in _safe(rows):
        print(
            f"{r['id']:<16} {r['addr']:<24} {r['weight']:>6}  "
            f"{'yes' if r['drain'] else 'no':<5}  {r['health']} {r['since']}"
        )


async def set_drain(store: EtcdStore, keys: Keys, service: str, uid: str, drain: bool) -> str:
    """Set or clear an upstream's drain flag in etcd; the new value."""
    key = keys.upstream(service, uid)
    kv = await store.get(key)
    if kv is None:
        raise PmlbError(f"no upstream {uid} in service {service}")
    try:
        spec = parse_upstream(uid, kv.value)
    except InvalidValue as exc:
        raise PmlbError(str(exc)) from None
    from dataclasses import replace

    value = format_upstream(replace(spec, drain=drain))
    await store.put(key, value)
    return value


def add_status_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    st = sub.add_parser("status", help="the cluster at a glance, from etcd and the nodes")
    st.add_argument("--json", action="store_true", help="print JSON")
    add_options(st, ETCD_OPTIONS)


def _store(args: argparse.Namespace) -> tuple[EtcdStore, Keys]:
    """The etcd client and key layout from the shared etcd options (flags,
    PMLB_ETCD* variables, --config)."""
    from pmlb.store.etcd import EtcdStore, settings_from

    values = resolve(ETCD_OPTIONS, args)
    return EtcdStore(settings_from(values)), Keys(values["etcd_prefix"])


def run_status(args: argparse.Namespace) -> int:
    report = asyncio.run(_status(args))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_status_table(report))
    return 0


async def _scrape(admin: str) -> tuple[dict[str, float] | None, str]:
    """A node's /metrics as {'name{labels}': value} and "", or None and why
    not. Bounded in total time and size, no redirect followed (pmlb.observability
    .scrape): the address is whatever etcd says."""
    from prometheus_client.parser import text_string_to_metric_families

    from pmlb.observability import scrape

    try:
        status, body = await scrape.get(admin, "/metrics")
    except scrape.ScrapeError as exc:
        return None, str(exc)
    if status != 200:
        return None, f"/metrics answered {status}"
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(body.decode("utf-8")):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        # The parser raises these on text that is not the Prometheus format.
        return None, f"/metrics is not Prometheus text ({exc.__class__.__name__})"
    return out, ""


async def _status(args: argparse.Namespace) -> dict[str, Any]:
    store, keys = _store(args)
    await store.connect()
    try:
        return await cluster_status(store, keys)
    finally:
        await store.close()


async def cluster_status(store: EtcdStore, keys: Keys) -> dict[str, Any]:
    """Nodes (with what their admin endpoints say) and services, from etcd."""
    _, kvs = await store.get_prefix(keys.prefix + "/")
    nodes = _nodes(kvs, keys)
    services = _services(kvs, keys)
    scrapes = await asyncio.gather(
        *(_scrape(n["admin"]) if n.get("admin") else _none() for n in nodes)
    )
    now = datetime.now(UTC)
    for node, (m, why) in zip(nodes, scrapes, strict=True):
        _add_scrape(node, m, why, services, now)
    return {
        "nodes": sorted(nodes, key=lambda n: n["id"]),
        "services": {
            name: {
                "checker": s["checker"],
                "upstreams": [u for _, u in sorted(s["upstreams"].items()) if "addr" in u],
            }
            for name, s in sorted(services.items())
        },
    }


def _nodes(kvs: list[KV], keys: Keys) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = []
    for kv in kvs:
        if not kv.key.startswith(keys.nodes()):
            continue
        try:
            node_id = Keys.leaf(keys.nodes(), kv.key)
        except InvalidValue:
            continue
        try:
            info = parse_node(node_id, kv.value)
        except InvalidValue as exc:
            # One bad value costs its own row, shown as such, not the report.
            nodes.append({"id": node_id, "malformed": str(exc), "listen": [], "services": []})
            continue
        workers = info.get("workers")
        # A node of several processes is one node: one row, its worker count.
        info["workers"] = len(workers) if workers else 1
        # A node registers under its session's lease; a key without one was
        # written by hand (or by someone else) and is not a live node.
        nodes.append({"id": node_id, **info, "leased": kv.lease != 0})
    return nodes


def _services(kvs: list[KV], keys: Keys) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        parts = kv.key[len(keys.prefix) + 1 :].split("/")
        if len(parts) < 3 or parts[0] != "services":
            continue
        svc = services.setdefault(parts[1], {"checker": "", "upstreams": {}})
        try:
            if parts[2] == "checker" and len(parts) == 3:
                svc["checker"] = kv.value.decode(errors="replace")
            elif parts[2] == "upstreams" and len(parts) == 4:
                spec = parse_upstream(parts[3], kv.value)
                u = svc["upstreams"].setdefault(parts[3], {"health": UNKNOWN, "marks": 0})
                u.update(
                    {"id": spec.id, "addr": spec.addr, "weight": spec.weight, "drain": spec.drain}
                )
            elif parts[2] == "health" and len(parts) == 4:
                h = parse_health(parts[3], kv.value)
                u = svc["upstreams"].setdefault(parts[3], {"health": UNKNOWN, "marks": 0})
                u["health"] = h.status
        except InvalidValue:
            continue
    return services


def _add_scrape(
    node: dict[str, Any],
    m: dict[str, float] | None,
    why: str,
    services: dict[str, dict[str, Any]],
    now: datetime,
) -> None:
    """What a node's /metrics said, on its row and its services' upstreams."""
    from pmlb.observability import metrics  # the node's dependencies: not for --help

    node["reachable"] = m is not None
    if why:
        node["scrape_error"] = why
    node["marks"] = _count(m, metrics.MARKS_OPEN)
    # Counters, for rates computed by whoever polls (the dashboard).
    node["accepted_total"] = _count(m, metrics.ACCEPTED_TOTAL)
    node["frames_in_total"] = _count(m, metrics.FRAMES_IN_TOTAL)
    node["frames_out_total"] = _count(m, metrics.FRAMES_OUT_TOTAL)
    try:
        started = datetime.fromisoformat(str(node.get("started_at", "")).replace("Z", "+00:00"))
        node["age_seconds"] = round((now - started).total_seconds())
    except (ValueError, TypeError):  # TypeError: a naive time, no zone to subtract
        node["age_seconds"] = None
    if not m:
        return
    for svc_name in node.get("services", []):
        svc = services.setdefault(svc_name, {"checker": "", "upstreams": {}})
        for uid, u in svc["upstreams"].items():
            label = f'{{upstream="{uid}"}}'
            u["marks"] += _count(m, metrics.UPSTREAM_MARKS + label) or 0
            # The link as each node sees it (the checker's view is "health").
            up = m.get(metrics.UPSTREAM_UP + label)
            u.setdefault("links", {})[node["id"]] = (
                "up" if up == 1 else "down" if up is not None else "-"
            )
            u["failovers"] = u.get("failovers", 0) + (
                _count(m, metrics.UPSTREAM_FAILOVERS_TOTAL + label) or 0
            )


async def _none() -> tuple[None, str]:
    return None, ""


def _count(m: dict[str, float] | None, name: str) -> int | None:
    """``name`` from a node's scrape as a count; None when it is missing or
    not a finite count (a node that reports NaN or +Inf loses that figure, not
    the page)."""
    from pmlb.observability.scrape import finite_count

    return finite_count(m.get(name)) if m else None


def _printable(text: str) -> str:
    """``text`` safe for a terminal: control and format characters (ESC, CR,
    newlines, bidi overrides) shown as escapes. Values come from etcd, which
    anyone with write access there fills: they must not drive the terminal
    (titles, colours, cursor moves) or forge rows."""
    return "".join(
        ch
        if ch.isprintable()
        else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def _safe(value: Any) -> Any:
    """A row of etcd-sourced values, each string (and list item) printable."""
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, list):
        return [_safe(v) for v in value]
    if isinstance(value, dict):
        return {_safe(k): _safe(v) for k, v in value.items()}
    return value


def _status_table(r: dict[str, Any]) -> str:
    r = _safe(r)
    lines = [f"{'NODE':<16} {'LISTEN':<22} {'AGE':>8} {'WORKERS':>7} {'MARKS':>7}  SERVICES"]
    notes = []
    for n in r["nodes"]:
        age = f"{n['age_seconds']}s" if n.get("age_seconds") is not None else "-"
        if n.get("malformed"):
            marks = "malformed"
            notes.append(n["malformed"])  # "node <id>: what is wrong"
        elif not n.get("reachable"):
            marks = "unreachable"
        else:
            marks = str(n["marks"]) if n.get("marks") is not None else "?"
        if n.get("scrape_error"):
            notes.append(f"node {n['id']}: {n['scrape_error']}")
        if n.get("leased") is False:
            notes.append(f"node {n['id']}: its key has no lease (written by hand, not a live node)")
        lines.append(
            f"{n['id']:<16} {','.join(n.get('listen', [])):<22} {age:>8} "
            f"{n.get('workers', '-'):>7} {marks:>7}  {','.join(n.get('services', []))}"
        )
    lines += [f"  ! {note}" for note in notes]
    for name, s in r["services"].items():
        lines += [
            "",
            f"service {name}   checker: {s['checker'] or '-'}",
            f"  {'UPSTREAM':<14} {'ADDRESS':<22} {'WEIGHT':>6} {'DRAIN':<5} "
            f"{'HEALTH':<11} {'MARKS':>6}",
        ]
        for u in s["upstreams"]:
            lines.append(
                f"  {u['id']:<14} {u['addr']:<22} {u['weight']:>6} "
                f"{'yes' if u['drain'] else 'no':<5} {u['health']:<11} {u['marks']:>6}"
            )
    return "\n".join(lines)
