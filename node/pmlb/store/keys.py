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

from pmlb.errors import ConfigError, PmlbError
from pmlb.protocol.domain import UpstreamSpec, parse_hostport

SERVING: Final = "SERVING"
NOT_SERVING: Final = "NOT_SERVING"
UNKNOWN: Final = "UNKNOWN"
MAX_WEIGHT: Final = 10_000
# pmlb's own values are a few hundred bytes, two levels deep; anything far
# beyond is a mistake or an attack (a 2 KB value nested 1,000 deep makes
# json.loads raise RecursionError), refused before parsing.
MAX_VALUE_BYTES: Final = 64 << 10
MAX_JSON_DEPTH: Final = 8
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def valid_id(text: str) -> bool:
    """An upstream (or service) id as the keys allow it: what ``Keys.leaf`` reads back."""
    return bool(_ID_RE.match(text))


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


def load_json(what: str, raw: bytes | str) -> Any:
    """Parse a JSON value from etcd; InvalidValue when it is not UTF-8, not
    JSON, over MAX_VALUE_BYTES or nested deeper than MAX_JSON_DEPTH."""
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidValue(f"{what}: value of {len(raw)} bytes, over {MAX_VALUE_BYTES}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise InvalidValue(f"{what}: value is not UTF-8") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise InvalidValue(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidValue(f"{what}: bad JSON ({getattr(exc, 'msg', exc)})") from None


def _depth(text: str) -> int:
    """The deepest nesting of [ and { in ``text``, ignoring string contents."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def parse_upstream(uid: str, raw: bytes) -> UpstreamSpec:
    """``host:port`` or JSON ``{"addr": "host:port", "weight": 1, "drain": false}``."""
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidValue(f"upstream {uid}: value of {len(raw)} bytes, over {MAX_VALUE_BYTES}")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidValue(f"upstream {uid}: value is not UTF-8") from None
    if not text:
        raise InvalidValue(f"upstream {uid}: empty value")
    addr, weight, drain = text, 1, False
    if text.startswith("{"):
        obj = load_json(f"upstream {uid}", text)
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
    obj = load_json(f"health {uid}", raw)
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


# The node value's fields and their JSON types. Readers (pmlb status, the
# cluster page, dns-sync, MarkClient) index and iterate them, so a value with
# ``"services": 5`` is refused here, once, not met as a TypeError there.
_NODE_STRINGS: Final = ("control", "admin", "version", "started_at")
_NODE_LISTS: Final = ("listen", "services")


def parse_node(node_id: str, raw: bytes) -> dict[str, Any]:
    """A node's registration: an object whose known fields have their
    documented types (unknown fields are kept, for newer nodes)."""
    what = f"node {node_id}"
    obj = load_json(what, raw)
    if not isinstance(obj, dict):
        raise InvalidValue(f"{what}: JSON must be an object")
    for name in _NODE_STRINGS:
        if name in obj and not isinstance(obj[name], str):
            raise InvalidValue(f"{what}: {name} must be a string")
    for name in _NODE_LISTS:
        value = obj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidValue(f"{what}: {name} must be a list of strings")
    workers = obj.get("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        raise InvalidValue(f"{what}: workers must be a list of objects")
    return obj
