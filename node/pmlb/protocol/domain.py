"""Domain types and names every layer shares: host:port addresses, upstream
specs, the framing and balancer names.

A low module (it imports nothing of pmlb but errors), so that config, store,
cluster and dataplane can all use these without importing one another.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from pmlb.errors import ConfigError

# The framings named by one word; length-field:..., delimiter:... and
# plugin:NAME are spelled with their settings (see parse_framing).
FRAMINGS: Final = ("raw", "line", "len16", "len32", "mqtt", "modbus-tcp", "smpp", "stomp")
# Entry-point group where a plug-in framing (a decoder class) is found.
FRAMING_PLUGINS: Final = "pmlb.framings"
BALANCERS: Final = ("round-robin", "least-marks", "p2c", "hash")


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a tuple; ConfigError when malformed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:7001)")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: port {port} in {value!r} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address (127.0.0.0/8, ::1, v4-mapped) or
    ``localhost``. Any other name may resolve anywhere: not loopback."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True, slots=True)
class LengthField:
    """Netty's LengthFieldBasedFrameDecoder rule. A message is
    ``offset + size + value + adjust`` bytes from its start, where ``value`` is
    the length field read at ``offset`` (``size`` 1, 2, 3, 4 or 8 bytes, or 0:
    a varint, 7 bits a byte, least significant first, at most 4 bytes, as
    MQTT's Remaining Length); the first ``strip`` bytes are not delivered."""

    offset: int = 0
    size: int = 2
    big_endian: bool = True
    adjust: int = 0
    strip: int = 0

    @property
    def max_value(self) -> int:
        return (1 << 28) - 1 if self.size == 0 else (1 << (8 * self.size)) - 1


@dataclass(frozen=True, slots=True)
class FramingSpec:
    """A client framing as configured (``--framing``)."""

    spelling: str
    kind: str  # raw, line, length, delimiter, stomp, plugin
    length: LengthField | None = None
    delimiter: bytes = b""
    keep: bool = False
    plugin: str = ""

    @property
    def message(self) -> bool:
        """One Data frame is one whole protocol message (all but raw)."""
        return self.kind != "raw"


_PRESETS: Final[dict[str, FramingSpec]] = {
    "raw": FramingSpec("raw", "raw"),
    "line": FramingSpec("line", "line", delimiter=b"\n"),
    "len16": FramingSpec("len16", "length", LengthField(0, 2, True, 0, 2)),
    "len32": FramingSpec("len32", "length", LengthField(0, 4, True, 0, 4)),
    # Fixed header byte, then Remaining Length as a varint (MQTT 3.1.1 and 5).
    "mqtt": FramingSpec("mqtt", "length", LengthField(1, 0, True, 0, 0)),
    # MBAP: transaction id, protocol id, then the length of what follows it.
    "modbus-tcp": FramingSpec("modbus-tcp", "length", LengthField(4, 2, True, 0, 0)),
    # command_length counts the whole PDU, itself included.
    "smpp": FramingSpec("smpp", "length", LengthField(0, 4, True, -4, 0)),
    "stomp": FramingSpec("stomp", "stomp"),
}
_SIZES: Final = {"1": 1, "2": 2, "3": 3, "4": 4, "8": 8, "varint": 0}


def _settings(spelling: str, text: str, known: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ConfigError(
                f"framing {spelling!r}: {item!r} is not one of {', '.join(k + '=' for k in known)}"
            )
        out[key] = value.strip()
    return out


def _int(spelling: str, key: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"framing {spelling!r}: {key}={value!r} is not a number") from None
    if not low <= n <= high:
        raise ConfigError(f"framing {spelling!r}: {key} must be {low} to {high}, got {n}")
    return n


def _length_field(spelling: str, text: str) -> FramingSpec:
    s = _settings(spelling, text, ("offset", "size", "order", "adjust", "strip"))
    size = _SIZES.get(s.get("size", "2"))
    if size is None:
        raise ConfigError(
            f"framing {spelling!r}: size must be 1, 2, 3, 4, 8 or varint, got {s['size']!r}"
        )
    order = s.get("order", "big")
    if order not in ("big", "little"):
        raise ConfigError(f"framing {spelling!r}: order must be big or little, got {order!r}")
    offset = _int(spelling, "offset", s.get("offset", "0"), 0, 1024)
    field = LengthField(
        offset,
        size,
        order == "big",
        _int(spelling, "adjust", s.get("adjust", "0"), -(1 << 31), 1 << 31),
        _int(spelling, "strip", s.get("strip", "0"), 0, 1024 + 8),
    )
    if field.strip not in (0, offset + size) or (field.strip and (offset or not size)):
        # What an upstream sends must become a whole message again: either it
        # is one (strip 0) or the node can put the length field back in front.
        raise ConfigError(
            f"framing {spelling!r}: strip must be 0 (upstreams get and send whole "
            "messages) or the size of a fixed length field at offset 0"
        )
    return FramingSpec(spelling, "length", field)


def _delimiter(spelling: str, text: str) -> FramingSpec:
    s = _settings(spelling, text, ("hex", "text", "keep"))
    if ("hex" in s) == ("text" in s):
        raise ConfigError(f"framing {spelling!r}: give the delimiter as hex=... or text=...")
    try:
        if "hex" in s:
            delimiter = bytes.fromhex(s["hex"])
        else:
            delimiter = s["text"].encode("latin-1").decode("unicode_escape").encode("latin-1")
    except (ValueError, UnicodeError) as exc:
        raise ConfigError(f"framing {spelling!r}: bad delimiter ({exc})") from None
    if not 1 <= len(delimiter) <= 16:
        raise ConfigError(f"framing {spelling!r}: the delimiter must be 1 to 16 bytes")
    keep = s.get("keep", "no").lower()
    if keep not in ("yes", "no", "true", "false"):
        raise ConfigError(f"framing {spelling!r}: keep must be yes or no, got {keep!r}")
    return FramingSpec(spelling, "delimiter", delimiter=delimiter, keep=keep in ("yes", "true"))


def parse_framing(spelling: str) -> FramingSpec:
    """``--framing``: a name (raw, line, len16, len32, mqtt, modbus-tcp, smpp,
    stomp), ``length-field:offset=N,size=1|2|3|4|8|varint,order=big|little,
    adjust=N,strip=N``, ``delimiter:hex=HEX|text=TEXT,keep=yes|no`` or
    ``plugin:NAME`` (a decoder class registered under the ``pmlb.framings``
    entry point group). ConfigError says what is wrong."""
    spelling = spelling.strip()
    preset = _PRESETS.get(spelling)
    if preset is not None:
        return preset
    kind, sep, rest = spelling.partition(":")
    if sep and kind == "length-field":
        return _length_field(spelling, rest)
    if sep and kind == "delimiter":
        return _delimiter(spelling, rest)
    if sep and kind == "plugin":
        from importlib.metadata import entry_points

        names = sorted(ep.name for ep in entry_points(group=FRAMING_PLUGINS))
        if rest not in names:
            have = ", ".join(names) or "none installed"
            raise ConfigError(f"framing {spelling!r}: no plug-in {rest!r} ({have})")
        return FramingSpec(spelling, "plugin", plugin=rest)
    raise ConfigError(
        f"unknown framing {spelling!r} (choose from {', '.join(FRAMINGS)}, "
        "length-field:..., delimiter:..., plugin:NAME)"
    )


def check_framing(framing: str, max_frame: int) -> FramingSpec:
    spec = parse_framing(framing)
    if max_frame < 1:
        raise ConfigError(f"max frame size must be positive, got {max_frame}")
    field = spec.length
    if field is not None and field.strip and max_frame - field.adjust > field.max_value:
        raise ConfigError(
            f"{framing} framing carries at most {field.max_value + field.adjust} bytes, "
            f"max frame is {max_frame}"
        )
    return spec


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
