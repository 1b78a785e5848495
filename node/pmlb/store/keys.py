"""The etcd key layout and value formats: pmlb's public contract with operators.

    <prefix>/services/<svc>/upstreams/<id>   host:port | {"addr":..,"weight":1,"drain":false}
    <prefix>/services/<svc>/health/<id>      {"status":"SERVING"|"NOT_SERVING","since":..,
                                              "checker":..,"detail":..}
    <prefix>/services/<svc>/checker          the checker's node id (election key)
    <prefix>/nodes/<node id>                 {"listen":[..],"control":..,"admin":..,
                                              "services":[..],"version":..,"started_at":..}

Parsing is strict and never raises anything but InvalidValue, so a malformed
value typed by hand is logged and ignored by the caller, never fatal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pmlb.config import UpstreamSpec, parse_hostport
from pmlb.errors import ConfigError, PmlbError

SERVING: Final = "SERVING"
NOT_SERVING: Final = "NOT_SERVING"
UNKNOWN: Final = "UNKNOWN"
MAX_WEIGHT: Final = 10_000
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class InvalidValue(PmlbError):
    """An etcd key or value does not follow the documented format."""


class Keys:
    def __init__(self, prefix: str = "/pmlb") -> None:
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""

    def service(self, svc: str) -> str:
        return f"{self.prefix}/services/{svc}/"

    def upstreams(self, svc: str) -> str:
        return f"{self.prefix}/services/{svc}/upstreams/"

    def upstream(self, svc: str, uid: str) -> str:
        return self.upstreams(svc) + uid

    def healths(self, svc: str) -> str:
        return f"{self.prefix}/services/{svc}/health/"

    def health(self, svc: str, uid: str) -> str:
        return self.healths(svc) + uid

    def checker(self, svc: str) -> str:
        return f"{self.prefix}/services/{svc}/checker"

    def nodes(self) -> str:
        return f"{self.prefix}/nodes/"

    def node(self, node_id: str) -> str:
        return self.nodes() + node_id

    @staticmethod
    def leaf(prefix: str, key: str) -> str:
        """The id part of ``key`` under ``prefix``; InvalidValue if it is not a plain id."""
        if not key.startswith(prefix):
            raise InvalidValue(f"key {key!r} is not under {prefix!r}")
        leaf = key[len(prefix) :]
        if not _ID_RE.match(leaf):
            raise InvalidValue(f"key {key!r}: {leaf!r} is not a valid id")
        return leaf


def parse_upstream(uid: str, raw: bytes) -> UpstreamSpec:
    """``host:port`` or JSON ``{"addr": "host:port", "weight": 1, "drain": false}``."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidValue(f"upstream {uid}: value is not UTF-8") from None
    if not text:
        raise InvalidValue(f"upstream {uid}: empty value")
    addr, weight, drain = text, 1, False
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidValue(f"upstream {uid}: bad JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InvalidValue(f"upstream {uid}: JSON must be an object")
        unknown = set(obj) - {"addr", "weight", "drain"}
        if unknown:
            raise InvalidValue(f"upstream {uid}: unknown field {sorted(unknown)[0]!r}")
        raw_addr = obj.get("addr")
        weight = obj.get("weight", 1)
        drain = obj.get("drain", False)
        if not isinstance(raw_addr, str):
            raise InvalidValue(f"upstream {uid}: 'addr' must be a \"host:port\" string")
        addr = raw_addr
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise InvalidValue(f"upstream {uid}: 'weight' must be an integer 1..{MAX_WEIGHT}")
        if not isinstance(drain, bool):
            raise InvalidValue(f"upstream {uid}: 'drain' must be true or false")
    try:
        parse_hostport(addr, f"upstream {uid}")
    except ConfigError as exc:
        raise InvalidValue(str(exc)) from None
    return UpstreamSpec(id=uid, addr=addr, weight=weight, drain=drain)


def format_upstream(spec: UpstreamSpec) -> str:
    if spec.weight == 1 and not spec.drain:
        return spec.addr
    return json.dumps({"addr": spec.addr, "weight": spec.weight, "drain": spec.drain})


@dataclass(frozen=True, slots=True)
class Health:
    status: str
    since: str = ""
    checker: str = ""
    detail: str = ""


def parse_health(uid: str, raw: bytes) -> Health:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidValue(f"health {uid}: not JSON") from None
    if not isinstance(obj, dict) or obj.get("status") not in (SERVING, NOT_SERVING):
        raise InvalidValue(f"health {uid}: 'status' must be SERVING or NOT_SERVING")
    return Health(
        str(obj["status"]),
        str(obj.get("since", "")),
        str(obj.get("checker", "")),
        str(obj.get("detail", "")),
    )


def format_health(h: Health) -> str:
    return json.dumps(
        {"status": h.status, "since": h.since, "checker": h.checker, "detail": h.detail}
    )


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_node(info: dict[str, Any]) -> str:
    return json.dumps(info, sort_keys=True)


def parse_node(node_id: str, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidValue(f"node {node_id}: not JSON") from None
    if not isinstance(obj, dict):
        raise InvalidValue(f"node {node_id}: JSON must be an object")
    return obj
