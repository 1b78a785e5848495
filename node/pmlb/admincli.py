"""``pmlb upstream add|rm|drain|undrain|ls``: operate the upstream keys in etcd.

The same keys an operator writes with etcdctl (see pmlb.store.keys); this is
only a friendlier, validating front end.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from pmlb.config import parse_hostport
from pmlb.errors import ConfigError, PmlbError
from pmlb.store.etcd import EtcdSettings, EtcdStore
from pmlb.store.keys import (
    UNKNOWN,
    InvalidValue,
    Keys,
    format_upstream,
    parse_health,
    parse_upstream,
)


def add_upstream_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("upstream", help="add, remove, drain or list upstreams in etcd")
    up.add_argument("action", choices=("add", "rm", "drain", "undrain", "ls"))
    up.add_argument("service")
    up.add_argument("id", nargs="?")
    up.add_argument("addr", nargs="?", metavar="HOST:PORT")
    up.add_argument("--weight", type=int, default=1)
    up.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd endpoints URL[,URL]")
    up.add_argument("--etcd-prefix", default="/pmlb")
    up.add_argument("--json", action="store_true", help="ls: print JSON")


def run_upstream(args: argparse.Namespace) -> int:
    if args.action in ("add", "rm", "drain", "undrain") and not args.id:
        raise ConfigError(f"upstream {args.action} needs an ID")
    if args.action == "add":
        if not args.addr:
            raise ConfigError("upstream add needs HOST:PORT")
        parse_hostport(args.addr, "HOST:PORT")
        if not 1 <= args.weight <= 10_000:
            raise ConfigError("--weight must be 1..10000")
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    endpoints = tuple(p.strip() for p in args.etcd.split(",") if p.strip())
    store = EtcdStore(EtcdSettings(endpoints=endpoints))
    keys = Keys(args.etcd_prefix)
    await store.connect()
    try:
        key = keys.upstream(args.service, args.id) if args.id else ""
        if args.action == "add":
            from pmlb.config import UpstreamSpec

            spec = UpstreamSpec(id=args.id, addr=args.addr, weight=args.weight)
            await store.put(key, format_upstream(spec))
            print(f"{key} = {format_upstream(spec)}")
        elif args.action == "rm":
            if not await store.delete(key):
                raise PmlbError(f"no upstream {args.id} in service {args.service}")
            print(f"removed {key}")
        elif args.action in ("drain", "undrain"):
            kv = await store.get(key)
            if kv is None:
                raise PmlbError(f"no upstream {args.id} in service {args.service}")
            try:
                spec = parse_upstream(args.id, kv.value)
            except InvalidValue as exc:
                raise PmlbError(str(exc)) from None
            from dataclasses import replace

            spec = replace(spec, drain=args.action == "drain")
            await store.put(key, format_upstream(spec))
            print(f"{key} = {format_upstream(spec)}")
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
    print(f"service {args.service}   checker: {checker or '-'}")
    print(f"{'ID':<16} {'ADDRESS':<24} {'WEIGHT':>6}  {'DRAIN':<5}  HEALTH")
    for r in rows:
        print(
            f"{r['id']:<16} {r['addr']:<24} {r['weight']:>6}  "
            f"{'yes' if r['drain'] else 'no':<5}  {r['health']} {r['since']}"
        )
