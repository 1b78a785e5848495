"""Typed, frozen configuration, read from flags, ``PMLB_*`` variables and TOML.

Every option is declared once in an ``Option`` table per command; the CLI,
the environment and the config file are all read through that table, so they
cannot drift. Precedence: flag > ``PMLB_<FLAG>`` > ``--config`` file > default.
A repeated option takes a comma-separated list in the environment and a TOML
array (or string) in the file. Any invalid value raises ConfigError with one
line that names the option and where it came from.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from pmlb.errors import ConfigError
from pmlb.protocol.domain import (
    BALANCERS,
    UpstreamSpec,
    check_framing,
    is_loopback,
    parse_hostport,
)
from pmlb.protocol.ids import valid_node_id
from pmlb.protocol.wire import DEFAULT_WINDOW
from pmlb.transport import DEFAULT_TRANSPORT, TRANSPORTS


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # flag name without dashes, e.g. "max-frame"
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    repeated: bool = False
    choices: Sequence[str] | None = None
    metavar: str | None = None
    reloadable: bool = False  # SIGHUP applies a change to a running node

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "PMLB_" + self.dest.upper()


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError(f"must be 0 or more, got {n}")
    return n


def _non_negative_float(v: str) -> float:
    n = float(v)
    if not n >= 0:  # NaN too
        raise ValueError(f"must be 0 or more, got {v}")
    return n


def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise ValueError("must be positive")
    return n


def _positive_float(v: str) -> float:
    n = float(v)
    if n <= 0:
        raise ValueError("must be positive")
    return n


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
# HAProxy-style k/m/g and the IEC KiB/MiB/GiB are powers of 1024; KB/MB/GB are SI.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def parse_duration(v: str) -> float:
    """Seconds from ``500ms``, ``30s``, ``5m``, ``1h`` or a bare number of seconds."""
    m = _DURATION.match(v)
    if not m:
        raise ValueError("expected a duration like 500ms, 30s, 5m or a number of seconds")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(v: str) -> int:
    """Bytes from ``64KiB``, ``1MiB``, ``512k``, ``10MB`` or a bare number of bytes."""
    m = _SIZE.match(v)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError("expected a size like 65536, 64KiB, 1MiB or 10MB")
    return int(m.group(1)) * _SIZE_UNITS[unit]


def _duration(v: str) -> float:
    """A duration of zero or more (0 usually means "never")."""
    return parse_duration(v)


def _positive_duration(v: str) -> float:
    n = parse_duration(v)
    if n <= 0:
        raise ValueError("must be positive")
    return n


def _whole_seconds(v: str) -> int:
    n = parse_duration(v)
    if n < 1 or n != int(n):
        raise ValueError("must be a whole number of seconds, at least 1")
    return int(n)


def _positive_size(v: str) -> int:
    n = parse_size(v)
    if n <= 0:
        raise ValueError("must be positive")
    return n


def _hostport(v: str) -> str:
    parse_hostport(v)
    return v


# How every command reaches etcd (node, upstream, status, dns-sync; MarkClient
# reads the same PMLB_ETCD* variables): one declaration, so they cannot differ.
ETCD_OPTIONS: tuple[Option, ...] = (
    Option(
        "etcd",
        "etcd endpoints URL[,URL] (every member: hostnames and [IPv6] accepted)",
        ["http://127.0.0.1:2379"],
        repeated=True,
    ),
    Option("etcd-prefix", "etcd key prefix", "/pmlb"),
    Option("etcd-user", "etcd user name (password from --etcd-password)"),
    Option("etcd-password", "etcd password (prefer PMLB_ETCD_PASSWORD)"),
    Option("etcd-ca", "CA bundle (PEM) to verify etcd"),
    Option("etcd-cert", "client certificate (PEM) for etcd"),
    Option("etcd-key", "client key (PEM) for etcd"),
)

_ETCD: Final = {o.name: o for o in ETCD_OPTIONS}


def _declared(option: Option, *, secret: bool = False) -> Any:
    """A NodeConfig field declared by its option: the option (flag, variable,
    TOML key, default, parsing, help) is the field's only declaration; the
    field adds its type. NODE_OPTIONS, the CLI, the variables, the TOML keys
    and README's table come from the fields. node_config fills each with its
    option's resolved value, or derives it (addresses parsed, upstreams, the
    node id's default). ``secret``: never in the config's repr (logs)."""
    return field(repr=not secret, metadata={"option": option})


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's configuration; each field declared once, with its option."""

    listen: tuple[tuple[str, int], ...] = _declared(
        Option("listen", "client listener HOST:PORT (repeatable)", repeated=True, type=_hostport)
    )
    service: str = _declared(
        Option("service", "the service this node's listeners serve", "default")
    )
    node_id: str = _declared(
        Option("node-id", "node id, part of every mark (default: <hostname>-<first port>)")
    )
    workers: int = _declared(
        Option(
            "workers",
            "worker processes of this node, sharing its listeners (SO_REUSEPORT) and its one "
            "node id, admin and control address; 0 = one per CPU this process may use",
            0,
            _non_negative_int,
        )
    )
    reuse_port: bool = _declared(
        Option(
            "reuse-port",
            "bind the listeners with SO_REUSEPORT (set for each worker by --workers)",
            False,
            metavar="BOOL",
        )
    )
    upstreams: tuple[UpstreamSpec, ...] = _declared(
        Option(
            "upstream",
            "static upstream HOST:PORT or ID=HOST:PORT, optionally ' weight=N'; "
            "no etcd (repeatable)",
            repeated=True,
            reloadable=True,
        )
    )
    etcd: tuple[str, ...] = _declared(
        Option("etcd", "etcd endpoints URL[,URL]; upstreams then come from etcd", repeated=True)
    )
    etcd_prefix: str = _declared(_ETCD["etcd-prefix"])
    etcd_user: str | None = _declared(_ETCD["etcd-user"])
    etcd_password: str | None = _declared(_ETCD["etcd-password"], secret=True)
    etcd_ca: str | None = _declared(_ETCD["etcd-ca"])
    etcd_cert: str | None = _declared(_ETCD["etcd-cert"])
    etcd_key: str | None = _declared(_ETCD["etcd-key"])
    lease_ttl: int = _declared(
        Option(
            "lease-ttl",
            "how long the node's etcd lease lives without keepalive",
            10,
            _whole_seconds,
        )
    )
    check_interval: float = _declared(
        Option(
            "check-interval",
            "time between health checks (checker only)",
            1.0,
            _positive_duration,
            reloadable=True,
        )
    )
    check_timeout: float = _declared(
        Option(
            "check-timeout",
            "time one health check may take",
            0.5,
            _positive_duration,
            reloadable=True,
        )
    )
    check_rise: int = _declared(
        Option(
            "check-rise", "successes in a row to turn SERVING", 2, _positive_int, reloadable=True
        )
    )
    check_fall: int = _declared(
        Option(
            "check-fall", "failures in a row to turn NOT_SERVING", 2, _positive_int, reloadable=True
        )
    )
    control: tuple[str, int] | None = _declared(
        Option("control", "control API HOST:PORT (pmlb.v1.Node)", type=_hostport)
    )
    control_token: str | None = _declared(
        Option(
            "control-token", "bearer token the control API requires (prefer PMLB_CONTROL_TOKEN)"
        ),
        secret=True,
    )
    control_cert: str | None = _declared(
        Option("control-cert", "serve the control API over TLS with this certificate chain (PEM)")
    )
    control_key: str | None = _declared(
        Option("control-key", "private key (PEM) for --control-cert")
    )
    control_client_ca: str | None = _declared(
        Option("control-client-ca", "control API clients must show a certificate signed by this CA")
    )
    admin: tuple[str, int] | None = _declared(
        Option(
            "admin",
            "admin HTTP HOST:PORT (/healthz, /readyz, /metrics, the /dashboard page)",
            type=_hostport,
        )
    )
    trace_url: str | None = _declared(
        Option(
            "trace-url",
            "link from a mark on the dashboard to its trace: a URL with {trace_id}, e.g. "
            "http://jaeger:16686/trace/{trace_id}",
        )
    )
    admin_token: str | None = _declared(
        Option(
            "admin-token",
            "bearer token POST /drain and /connections require (prefer PMLB_ADMIN_TOKEN); "
            "without one they answer only on a loopback admin address",
        ),
        secret=True,
    )
    upstream_token: str | None = _declared(
        Option(
            "upstream-token",
            "shared token sent to upstreams on every Bridge stream; SDK upstreams given the "
            "same PMLB_UPSTREAM_TOKEN refuse streams without it",
        ),
        secret=True,
    )
    push_upstreams: tuple[str, ...] = _declared(
        Option(
            "push-upstreams",
            "upstream ids allowed to send to, close or set metadata on marks bound elsewhere "
            "(* for all); others act only on their own marks (repeatable, or comma-separated)",
            repeated=True,
        )
    )
    link_transport: str = _declared(
        Option(
            "link-transport",
            "gRPC implementation of the links to upstreams, all the same gRPC (README Performance):"
            " nghttp2 (native; grpclib when not built, said at start-up), grpclib, grpcio",
            DEFAULT_TRANSPORT,
            choices=TRANSPORTS,
        )
    )
    framing: str = _declared(
        Option(
            "framing",
            "client framing: raw (reads as they come: a message may be split on failover), line, "
            "len16, len32, mqtt, modbus-tcp, smpp, stomp, "
            "length-field:offset=N,size=1|2|3|4|8|varint,order=big|little,adjust=N,strip=N, "
            "delimiter:hex=HEX|text=TEXT,keep=yes|no, or plugin:NAME (entry point group "
            "pmlb.framings)",
            "raw",
        )
    )
    max_frame: int = _declared(Option("max-frame", "maximum message size", 65535, _positive_size))
    balancer: str = _declared(
        Option(
            "balancer",
            "how new marks pick an upstream, all weighted (hash: by client IP)",
            "round-robin",
            choices=BALANCERS,
        )
    )
    window: int = _declared(
        Option("window", "per-mark flow-control window, each way", DEFAULT_WINDOW, _positive_size)
    )
    client_buffer: int = _declared(
        Option(
            "client-buffer",
            "buffered for a slow client before its mark stops taking upstream data",
            65536,
            _positive_size,
        )
    )
    link_buffer: int = _declared(
        Option(
            "link-buffer",
            "queued on one link before its clients stop being read",
            8 << 20,
            _positive_size,
        )
    )
    connect_timeout: float = _declared(
        Option(
            "connect-timeout",
            "how long a new client waits for a routable upstream",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    close_linger: float = _declared(
        Option(
            "close-linger",
            "how long a client that closed its side waits for the upstream's last replies",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    replay_buffer: int = _declared(
        Option(
            "replay-buffer",
            "unacknowledged client data kept per mark for failover (each frame + 64 bytes)",
            1 << 20,
            _positive_size,
        )
    )
    ack_timeout: float = _declared(
        Option(
            "ack-timeout",
            "how long an upstream may leave the link unanswered before it counts as hung",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    move_timeout: float = _declared(
        Option(
            "move-timeout",
            "how long an upstream has to answer a mark's move (drain, removal) with its "
            "last replies before the mark moves on without them",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    drain_rate: float = _declared(
        Option(
            "drain-rate",
            "marks per second moved off a draining upstream",
            200.0,
            _positive_float,
            reloadable=True,
        )
    )
    drain_timeout: float = _declared(
        Option(
            "drain-timeout",
            "how long a draining node keeps serving its marks",
            30.0,
            _positive_duration,
            reloadable=True,
        )
    )
    drain_window: float = _declared(
        Option(
            "drain-window",
            "time over which a draining node closes what is left",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    shutdown_timeout: float = _declared(
        Option(
            "shutdown-timeout",
            "time to flush links at the end of a stop",
            10.0,
            _positive_duration,
            reloadable=True,
        )
    )
    backlog: int = _declared(Option("backlog", "listen backlog", 4096, _positive_int))
    tls_cert: str | None = _declared(
        Option(
            "tls-cert",
            "serve clients TLS with this certificate chain (PEM); SIGHUP reloads",
            reloadable=True,
        )
    )
    tls_key: str | None = _declared(
        Option("tls-key", "private key (PEM) for --tls-cert", reloadable=True)
    )
    tls_client_ca: str | None = _declared(
        Option("tls-client-ca", "require client certificates signed by this CA (PEM)")
    )
    upstream_ca: str | None = _declared(
        Option("upstream-ca", "CA (PEM) that signs upstreams' certificates: links use TLS")
    )
    upstream_cert: str | None = _declared(
        Option("upstream-cert", "client certificate (PEM) the node shows upstreams (mTLS)")
    )
    upstream_key: str | None = _declared(
        Option("upstream-key", "private key (PEM) for --upstream-cert")
    )
    max_connections: int = _declared(
        Option(
            "max-connections",
            "open client connections of the whole node (every worker's counted); 0 = no limit",
            0,
            _non_negative_int,
            reloadable=True,
        )
    )
    max_per_client: int = _declared(
        Option(
            "max-per-client",
            "open connections per client IP, per worker process (with N workers a client may hold "
            "up to N times this); 0 = no limit",
            0,
            _non_negative_int,
            reloadable=True,
        )
    )
    accept_rate: float = _declared(
        Option(
            "accept-rate",
            "new connections the whole node accepts per second (workers take equal shares); "
            "0 = no limit",
            0.0,
            _non_negative_float,
            reloadable=True,
        )
    )
    max_meta: int = _declared(
        Option(
            "max-meta",
            "upstream-set metadata kept per mark",
            16384,
            _positive_size,
            reloadable=True,
        )
    )
    idle_timeout: float = _declared(
        Option(
            "idle-timeout",
            "close a client silent both ways this long; 0 = never",
            0.0,
            _duration,
            reloadable=True,
        )
    )
    client_keepalive: float = _declared(
        Option(
            "client-keepalive",
            "TCP keepalive on client connections: probe one silent this long, close it "
            "(client_reset) when 3 probes go unanswered, at 1.5x; the same bound on data "
            "it does not acknowledge; 0 = the system's settings (no probes by default)",
            60.0,
            _duration,
            reloadable=True,
        )
    )
    max_lifetime: float = _declared(
        Option(
            "max-lifetime",
            "close a connection after this long (-10% jitter); 0 = never",
            0.0,
            _duration,
            reloadable=True,
        )
    )
    proxy_trusted: tuple[str, ...] = _declared(
        Option(
            "proxy-trusted",
            "networks whose connections must start with a PROXY v1/v2 header (repeatable CIDR)",
            repeated=True,
        )
    )
    proxy_timeout: float = _declared(
        Option(
            "proxy-timeout",
            "how long a trusted peer has to send its PROXY header",
            5.0,
            _positive_duration,
            reloadable=True,
        )
    )
    dns_name: str | None = _declared(
        Option("dns-name", "publish this node under a DNS name (CoreDNS etcd plugin keys)")
    )
    dns_prefix: str = _declared(
        Option("dns-prefix", "etcd prefix of the CoreDNS etcd plugin", "/skydns")
    )
    dns_address: str | None = _declared(
        Option("dns-address", "IP to publish in DNS (default: the advertised address)")
    )
    advertise: str | None = _declared(
        Option(
            "advertise",
            "host other nodes, tools and upstreams reach this node at, for every address it "
            "registers (default: the bind address; for a wildcard bind, the local address "
            "the node reaches etcd from)",
        )
    )
    otlp_endpoint: str | None = _declared(
        Option("otlp-endpoint", "OTLP/gRPC trace endpoint (default: the OTEL_* variables; off)")
    )
    log_level: str = _declared(
        Option("log-level", "debug, info, warning or error", "info", reloadable=True)
    )
    log_format: str = _declared(
        Option("log-format", "text or json", "text", choices=("text", "json"))
    )


NODE_OPTIONS: tuple[Option, ...] = tuple(f.metadata["option"] for f in fields(NodeConfig))

ECHO_OPTIONS: tuple[Option, ...] = (
    Option("listen", "gRPC HOST:PORT to serve on", "127.0.0.1:4770", _hostport),
    Option("tls-cert", "serve gRPC over TLS with this certificate chain (PEM)"),
    Option("tls-key", "private key (PEM) for --tls-cert"),
    Option("tls-client-ca", "require node certificates signed by this CA (mTLS)"),
    Option("id", "upstream id, shown in replies", "u1"),
    Option(
        "upstream-token",
        "refuse Bridge streams from nodes that do not present this token (the nodes' "
        "--upstream-token; prefer PMLB_UPSTREAM_TOKEN)",
    ),
    Option(
        "link-transport",
        "gRPC implementation serving the Bridge (any node transport can connect; "
        "nghttp2 is native on the node's end and served here by grpclib)",
        DEFAULT_TRANSPORT,
        choices=TRANSPORTS,
    ),
    Option(
        "allow-anonymous",
        "serve beyond loopback without --upstream-token or --tls-client-ca (any peer "
        "that reaches it can act as a node)",
        False,
        metavar="BOOL",
    ),
    Option("plain", "echo payloads unchanged (benchmarks)", False, metavar="BOOL"),
    Option(
        "conformance",
        "run the conformance handler instead: echo unchanged plus the commands of "
        "`pmlb conformance` (proto/README.md)",
        False,
        metavar="BOOL",
    ),
    Option("window", "per-mark flow-control window", DEFAULT_WINDOW, _positive_size),
    Option("log-level", "debug, info, warning or error", "info"),
    Option("log-format", "text or json", "text", choices=("text", "json")),
)


DNS_SYNC_OPTIONS: tuple[Option, ...] = (
    *ETCD_OPTIONS,
    Option("hosts-file", "the hosts file to keep current (dnsmasq --addn-hosts)"),
    Option("name", "the DNS name the nodes answer for", "pmlb.local"),
    Option("service", "only nodes serving this service"),
    Option("dnsmasq-pid", "send this dnsmasq SIGHUP after each change", type=_positive_int),
    Option("dnsmasq-pidfile", "read dnsmasq's pid from this file"),
    Option("log-level", "debug, info, warning or error", "info"),
    Option("log-format", "text or json", "text", choices=("text", "json")),
)


def options_markdown(options: Sequence[Option]) -> str:
    """The README's option table, generated from ``options`` (a test checks it)."""
    rows = ["| flag | default | variable | SIGHUP | meaning |", "|---|---|---|---|---|"]
    for o in options:
        if o.default is None or o.default is False or o.default == []:
            default = ""
        elif isinstance(o.default, list):
            default = f"`{','.join(o.default)}`"
        else:
            default = f"`{o.default}`"
        meaning = o.help.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        if o.choices:
            meaning += ": " + ", ".join(f"`{c}`" for c in o.choices)
        if o.repeated and "repeatable" not in meaning:
            meaning += " (repeatable)"
        rows.append(
            f"| `--{o.name}` | {default} | `{o.env}` | {'live' if o.reloadable else ''} "
            f"| {meaning} |"
        )
    return "\n".join(rows) + "\n"


# `--help` in sections an operator scans (as HAProxy's and Envoy's manuals
# group theirs): each option's section, in the order the sections print.
HELP_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "listener": (
        "listen", "service", "node-id", "workers", "reuse-port", "framing", "max-frame",
        "backlog", "proxy-trusted", "proxy-timeout",
    ),
    "upstreams and links": (
        "upstream", "balancer", "window", "client-buffer", "link-buffer", "connect-timeout",
        "close-linger", "replay-buffer", "ack-timeout", "move-timeout", "link-transport",
        "push-upstreams",
        "upstream-token", "drain-rate",
    ),
    "cluster (etcd, health checks, DNS)": (
        "etcd", "etcd-prefix", "etcd-user", "etcd-password", "etcd-ca", "etcd-cert", "etcd-key",
        "lease-ttl", "check-interval", "check-timeout", "check-rise", "check-fall", "dns-name",
        "dns-prefix", "dns-address", "advertise",
    ),
    "limits": (
        "max-connections", "max-per-client", "accept-rate", "max-meta", "idle-timeout",
        "client-keepalive", "max-lifetime",
    ),
    "TLS": ("tls-cert", "tls-key", "tls-client-ca", "upstream-ca", "upstream-cert", "upstream-key"),
    "admin and control APIs": (
        "admin", "admin-token", "trace-url", "control", "control-token", "control-cert",
        "control-key", "control-client-ca",
    ),
    "observability": ("otlp-endpoint", "log-level", "log-format"),
    "shutdown": ("drain-timeout", "drain-window", "shutdown-timeout"),
}  # fmt: skip
_GROUP_OF: Final = {name: group for group, names in HELP_GROUPS.items() for name in names}


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Declare ``options`` on ``parser`` with every default None (so we see what was given).
    A command with many options (pmlb node) lists them in HELP_GROUPS' sections."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    if len(options) > 20:
        used = {_GROUP_OF.get(opt.name) for opt in options}
        sections = {g: parser.add_argument_group(g) for g in HELP_GROUPS if g in used}
    for opt in options:
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        group = _GROUP_OF.get(opt.name)
        if group in sections:
            target = sections[group]
        flag = "--" + opt.name
        default = opt.default
        shown = (
            f"default {','.join(default) if isinstance(default, list) else default}; "
            if not (default is None or default is False or default == [])
            else ""
        )
        # argparse %-formats help text: a literal % (e.g. "-10% jitter") must be doubled.
        help_ = f"{opt.help} ({shown}env {opt.env})".replace("%", "%%")
        if opt.default is False:
            target.add_argument(flag, dest=opt.dest, action="store_const", const=True, help=help_)
        elif opt.repeated:
            target.add_argument(flag, dest=opt.dest, action="append", help=help_)
        else:
            target.add_argument(flag, dest=opt.dest, help=help_, metavar=opt.metavar)
    parser.add_argument("--config", help="TOML config file (keys are the flag names)")


def _truthy(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(
    options: Sequence[Option],
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    errors: list[str] | None = None,
) -> dict[str, Any]:
    """Merge flags, environment and config file into one dict keyed by dest.

    The first invalid value raises ConfigError; with ``errors`` given, every
    invalid value is appended there instead (and its default used), which is
    what ``--check`` reports."""
    env = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or env.get("PMLB_CONFIG")
    file_values = _load_toml(config_path) if config_path else {}
    known = {o.dest for o in options}
    for name in sorted(set(file_values) - known):
        problem = f"config file {config_path}: unknown option {name!r}"
        if errors is None:
            raise ConfigError(problem)
        errors.append(problem)
    out: dict[str, Any] = {}
    for opt in options:
        raw: Any = getattr(args, opt.dest, None)
        source = "--" + opt.name
        if raw is None and opt.env in env:
            raw, source = env[opt.env], opt.env
            if opt.repeated:
                raw = [p for p in (s.strip() for s in raw.split(",")) if p]
        if raw is None and opt.dest in file_values:
            raw, source = file_values[opt.dest], f"{config_path}: {opt.name}"
            if opt.repeated and isinstance(raw, str):
                raw = [raw]
            elif not opt.repeated and isinstance(raw, (int, float, bool)):
                raw = str(raw).lower() if isinstance(raw, bool) else str(raw)
        try:
            out[opt.dest] = _convert(opt, raw, source)
        except ConfigError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
            out[opt.dest] = _convert(opt, None, source)
    return out


def _convert(opt: Option, raw: Any, source: str) -> Any:
    if raw is None:
        return list(opt.default or []) if opt.repeated else opt.default
    try:
        if opt.default is False:
            return raw if isinstance(raw, bool) else _truthy(str(raw))
        if opt.repeated:
            if not isinstance(raw, list):
                raise ValueError("expected a list")
            values = [opt.type(str(v)) for v in raw]
            if opt.choices:
                for v in values:
                    _check_choice(opt, v)
            return values
        value = opt.type(str(raw))
        if opt.choices:
            _check_choice(opt, value)
        return value
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid value {raw!r} ({exc})") from None


def _check_choice(opt: Option, value: str) -> None:
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(opt.choices)}")


# NodeConfig fields SIGHUP applies to a running node (from the options marked
# reloadable; --upstream is the "upstreams" field); any other change in the
# reloaded configuration is refused (logged, needs a restart).
RELOADABLE: frozenset[str] = frozenset(
    "upstreams" if o.dest == "upstream" else o.dest for o in NODE_OPTIONS if o.reloadable
)


def config_changes(old: NodeConfig, new: NodeConfig) -> tuple[dict[str, Any], list[str]]:
    """What differs between two configs: (reloadable field -> new value, refused fields)."""
    apply: dict[str, Any] = {}
    refused: list[str] = []
    for name in NodeConfig.__dataclass_fields__:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in RELOADABLE:
            apply[name] = after
        else:
            refused.append(name)
    return apply, refused


def parse_static_upstream(value: str) -> UpstreamSpec:
    """``host:port`` (id = the address) or ``id=host:port``, optionally followed
    by `` weight=N`` (1..10000), like etcd's JSON form."""
    parts = value.split()
    if not parts:
        raise ConfigError("upstream is empty: give HOST:PORT or ID=HOST:PORT")
    first, *rest = parts
    ident, sep, addr = first.partition("=")
    if not sep:
        ident, addr = first, first
    parse_hostport(addr, "upstream")
    if not ident:
        raise ConfigError(f"upstream id is empty in {value!r}")
    weight = 1
    for extra in rest:
        name, _, raw = extra.partition("=")
        if name != "weight" or not raw.isdigit() or not 1 <= int(raw) <= 10_000:
            raise ConfigError(f"upstream {value!r}: only 'weight=N' (1..10000) may follow")
        weight = int(raw)
    return UpstreamSpec(id=ident, addr=addr, weight=weight)


def node_config(values: Mapping[str, Any]) -> NodeConfig:
    """The node's configuration from resolved ``values``. ConfigError lists
    every problem found, one per line (``--check`` prints them all; a fix
    should not reveal the next one)."""
    problems: list[str] = []

    def attempt(check: Callable[[], Any], fallback: Any) -> Any:
        try:
            return check()
        except ConfigError as exc:
            problems.append(str(exc))
            return fallback

    listen = attempt(lambda: tuple(parse_hostport(v, "--listen") for v in values["listen"]), None)
    if listen == ():
        problems.append("--listen HOST:PORT is required")
    ups = attempt(lambda: tuple(parse_static_upstream(v) for v in values["upstream"]), None)
    etcd = attempt(lambda: etcd_endpoints(values["etcd"]), ())
    if etcd and (ups or (ups is None and values["upstream"])):
        problems.append("use either --etcd (upstreams from etcd) or --upstream (static), not both")
    if not values["upstream"] and not values["etcd"]:
        problems.append("give --etcd URL (cluster mode) or at least one --upstream HOST:PORT")
    problems.extend(_pairs(values))
    control = (
        attempt(lambda: parse_hostport(values["control"], "--control"), None)
        if values["control"]
        else None
    )
    # The admin rule: without credentials, loopback only. Whoever reaches an
    # open control API can send to and close every client of the node.
    anonymous = not (values["control_token"] or values["control_client_ca"])
    if control is not None and anonymous and not is_loopback(control[0]):
        problems.append(
            f"--control {values['control']} is not a loopback address: set "
            "--control-token (PMLB_CONTROL_TOKEN) or --control-client-ca (mutual TLS), "
            "or serve it on 127.0.0.1; whoever reaches an open control API can send to "
            "and close every client of the node"
        )
    if not values["service"] or "/" in values["service"]:
        problems.append(f"--service {values['service']!r}: a non-empty name without '/'")
    if ups and len({u.id for u in ups}) != len(ups):
        problems.append("--upstream ids must be unique")
    node_id = values["node_id"] or (_default_node_id(listen[0][1]) if listen else "")
    if node_id and not valid_node_id(node_id):
        problems.append(
            f"--node-id {node_id!r}: use 1-63 letters, digits, '.', '_' or '-', starting alnum"
        )
    attempt(lambda: check_framing(values["framing"], values["max_frame"]), None)
    if values["max_frame"] > 16 << 20:
        problems.append("--max-frame is at most 16777216 bytes")
    if values["log_level"].lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"--log-level {values['log_level']!r}: use debug, info, warning or error")
    if problems:
        raise ConfigError("\n".join(problems))
    derived = {
        "listen": listen,
        "node_id": node_id,
        "upstreams": ups or (),
        "etcd": etcd,
        "control": control,
        "admin": parse_hostport(values["admin"]) if values["admin"] else None,
        # "a,b" is two ids, as an operator writing it means (ids have no commas).
        "push_upstreams": tuple(
            uid.strip() for v in values["push_upstreams"] for uid in v.split(",") if uid.strip()
        ),
        "proxy_trusted": tuple(_cidrs(values["proxy_trusted"])),
        "log_level": values["log_level"].lower(),
    }
    # Every other field is its option's value as resolved: declared once, in
    # NODE_OPTIONS (test_config checks each field has an option or a line above).
    taken = {f: values[f] for f in NodeConfig.__dataclass_fields__ if f not in derived}
    return NodeConfig(**taken, **derived)


def _pairs(values: Mapping[str, Any]) -> list[str]:
    """Options that need another one."""
    out = []
    for a, b in (("tls_cert", "tls_key"), ("control_cert", "control_key"),
                 ("upstream_cert", "upstream_key")):  # fmt: skip
        if bool(values[a]) != bool(values[b]):
            out.append(f"--{_flag(a)} and --{_flag(b)} go together")
    if values["control_client_ca"] and not values["control_cert"]:
        out.append("--control-client-ca needs --control-cert (TLS)")
    if values["dns_name"] and not values["etcd"]:
        out.append("--dns-name needs --etcd (the DNS records live in etcd)")
    if values["etcd_user"] and not values["etcd_password"]:
        out.append("--etcd-user needs --etcd-password (or PMLB_ETCD_PASSWORD)")
    return out


def _flag(dest: str) -> str:
    return dest.replace("_", "-")


def _cidrs(values: list[str]) -> list[str]:
    import ipaddress

    out = []
    for v in values:
        for part in (p.strip() for p in v.split(",")):
            if not part:
                continue
            try:
                out.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise ConfigError(f"--proxy-trusted: {part!r} is not a network (CIDR)") from None
    return out


def _default_node_id(port: int) -> str:
    import socket

    host = socket.gethostname().split(".")[0] or "node"
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in host).strip("-_") or "node"
    return f"{cleaned[:50]}-{port}"


def etcd_endpoints(values: Sequence[str]) -> tuple[str, ...]:
    """``--etcd`` values (each maybe comma-separated) as one tuple of endpoints."""
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def etcd_values_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The etcd options from ``PMLB_ETCD*`` variables alone (for library users
    such as MarkClient, which have no command line)."""
    return resolve(ETCD_OPTIONS, argparse.Namespace(), environ)
