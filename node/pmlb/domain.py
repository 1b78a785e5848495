"""Domain types and names every layer shares: host:port addresses, upstream
specs, the framing and balancer names.

A low module (it imports nothing of pmlb but errors), so that config, store,
cluster and dataplane can all use these without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pmlb.errors import ConfigError

FRAMINGS: Final = ("raw", "line", "len16", "len32")
MESSAGE_FRAMINGS: Final = ("line", "len16", "len32")
BALANCERS: Final = ("round-robin", "least-marks", "p2c", "hash")


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a tuple; ConfigError when malformed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_framing(framing: str, max_frame: int) -> None:
    if framing not in FRAMINGS:
        raise ConfigError(f"unknown framing {framing!r} (choose from {', '.join(FRAMINGS)})")
    if max_frame < 1:
        raise ConfigError(f"max frame size must be positive, got {max_frame}")
    if framing == "len16" and max_frame > 0xFFFF:
        raise ConfigError(f"len16 framing carries at most 65535 bytes, max frame is {max_frame}")


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream as the node routes to it."""

    id: str
    addr: str
    weight: int = 1
    drain: bool = False
    # SERVING / NOT_SERVING as written by the service's checker, UNKNOWN when
    # there is no health entry (and always in static mode).
    health: str = "UNKNOWN"
