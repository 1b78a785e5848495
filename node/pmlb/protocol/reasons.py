"""Close reasons: the one list of words a mark can close with.

Every reason the node or the SDK writes is declared here, once, with what it
means. The proto's ``Close.reason`` comment and the README's table are checked
against this list by a test (tests/unit/test_reasons.py), so they cannot drift.

Reasons that come from outside (an upstream's Close frame, the control API's
``CloseRequest.reason``) are untrusted text: :func:`clean` makes them safe to
log and to hand on (printable ASCII, bounded length), and :func:`label` maps
them onto this fixed vocabulary for metrics, so a peer cannot mint new metric
series; any word not listed here counts as ``other``.
"""

from __future__ import annotations

from typing import Final

# (word, who sends it, what it means); the order is the documentation order.
VOCABULARY: Final[tuple[tuple[str, str, str], ...]] = (
    ("client_closed", "node", "the client closed its side (EOF)"),
    ("client_reset", "node", "the client connection failed (reset, timeout)"),
    ("upstream_closed", "both", "an upstream closed the mark"),
    (
        "upstream_error",
        "upstream",
        "an upstream handler raised for this mark; the SDK closed it (the node "
        "closes the client: it is not replayed elsewhere)",
    ),
    (
        "upstream_lost",
        "node",
        "the link to the bound upstream broke and the mark could not be moved",
    ),
    (
        "poison",
        "node",
        "the mark's unacknowledged frames were in flight on two upstream links "
        "that broke in a row; they are not replayed a third time",
    ),
    ("frame_too_large", "node", "the client sent a message over the maximum frame size"),
    ("no_upstream", "node", "no routable upstream within the connect timeout"),
    ("protocol_error", "node", "an upstream broke this contract for the mark"),
    ("unknown_mark", "node", "(node to upstream) the mark is not open on this node"),
    (
        "node_shutdown",
        "node",
        "the node is stopping (a safety net: the drain closes every mark first, "
        "as node_draining, so none is left to close this way)",
    ),
    ("node_draining", "node", "the node is draining and its drain timeout passed"),
    (
        "node_full",
        "node",
        "the node is at --max-connections (a safety net: at the limit the node stops "
        "accepting, and new clients wait in the listen backlog instead)",
    ),
    ("client_limit", "node", "the client address is at --max-per-client"),
    ("idle_timeout", "node", "nothing moved either way for --idle-timeout"),
    ("max_lifetime", "node", "the connection reached --max-lifetime"),
    ("replay_overflow", "node", "the mark's replay buffer overflowed (upstream not acknowledging)"),
    ("write_overflow", "node", "the client did not read and its buffer bound was hit"),
    (
        "moved",
        "node",
        "(node to upstream) the mark is being moved to another upstream (drain or "
        "removal): answer what you have, then close; the client connection stays open",
    ),
    ("closed_by_api", "node", "closed through the node's control API (pmlb.v1.Node)"),
)

WORDS: Final[frozenset[str]] = frozenset(w for w, _, _ in VOCABULARY)
OTHER: Final = "other"
MAX_LENGTH: Final = 64
MAX_DETAIL: Final = 256

CLIENT_CLOSED: Final = "client_closed"
CLIENT_RESET: Final = "client_reset"
UPSTREAM_CLOSED: Final = "upstream_closed"
UPSTREAM_ERROR: Final = "upstream_error"
UPSTREAM_LOST: Final = "upstream_lost"
POISON: Final = "poison"
FRAME_TOO_LARGE: Final = "frame_too_large"
NO_UPSTREAM: Final = "no_upstream"
PROTOCOL_ERROR: Final = "protocol_error"
UNKNOWN_MARK: Final = "unknown_mark"
NODE_SHUTDOWN: Final = "node_shutdown"
NODE_DRAINING: Final = "node_draining"
NODE_FULL: Final = "node_full"
CLIENT_LIMIT: Final = "client_limit"
IDLE_TIMEOUT: Final = "idle_timeout"
MAX_LIFETIME: Final = "max_lifetime"
REPLAY_OVERFLOW: Final = "replay_overflow"
WRITE_OVERFLOW: Final = "write_overflow"
MOVED: Final = "moved"
CLOSED_BY_API: Final = "closed_by_api"


def clean(text: str, limit: int = MAX_LENGTH) -> str:
    """``text`` made safe for logs and frames: printable ASCII only (anything
    else becomes ``?``), at most ``limit`` characters (cut ones end in ``...``)."""
    out = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def label(reason: str) -> str:
    """The metric label for ``reason``: itself when it is in the vocabulary, else ``other``."""
    return reason if reason in WORDS else OTHER


def for_log(reason: str) -> str:
    """``reason`` as a log field: a vocabulary word as is, anything else quoted."""
    return reason if reason in WORDS else repr(clean(reason))
