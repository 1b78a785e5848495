"""The exception hierarchy: every error pmlb raises on purpose derives from PmlbError."""

from __future__ import annotations


class PmlbError(Exception):
    """Root of pmlb's own errors."""


class ConfigError(PmlbError):
    """A flag, environment variable or config file value is invalid (CLI exit 2)."""


class FrameTooLarge(PmlbError):
    """A client message is larger than the service's maximum frame size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class FramingError(PmlbError):
    """Client input that breaks its framing's rule (a length field that cannot
    be, a varint too long, a STOMP body without its NUL): only that client is
    closed (protocol_error)."""


class MetadataTooLarge(PmlbError):
    """Metadata that would take a mark past the node's --max-meta."""


class InvalidMark(PmlbError):
    """A string is not a well-formed mark."""


class BackpressureError(PmlbError):
    """An upstream handler sent more than the SDK may buffer for one mark."""


class MarkGone(PmlbError):
    """The mark is not open (any more) on the node that owns it."""


class PushRefused(PmlbError):
    """The node did not accept a push: ``reason`` is the node's word
    ("not_permitted": this upstream is not in the node's --push-upstreams;
    "payload_too_large"), or "unconfirmed" when the link ended before the
    node confirmed it (it may or may not have been delivered)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"push not accepted: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail
