"""Every use of grpclib, h2 and hyperframe internals, in one place.

pmlb's grpclib transport (``h2lib``) needs four things those libraries do not
offer as API. Each is here, with the internals it touches named in
``INTERNALS`` and checked by ``check()`` when the transport is imported, so a
library release that moves them fails at start with one line that names the
library and the version range pmlb is tested with (``SUPPORTED``, the same
ranges as pyproject.toml's dependencies), not later inside a link.
``tests/unit/test_libpatch.py`` checks each one's behaviour against the
installed library.

1. ``raw_data_repr``: hyperframe's repr of a frame body, O(1) instead of
   O(n) (h2 formats it for every frame it receives, logging on or not). The
   report for hyperframe's maintainers is node/docs/upstream-reports/.
2. ``advertise_max_frame``: SETTINGS_MAX_FRAME_SIZE, which grpclib has no
   setting for.
3. ``patient_keepalive``: grpclib closes a connection whose keepalive PING
   is unanswered after its timeout; on a slow, busy link the answer waits
   behind data that is still moving.
4. ``bounded_recv_message``: grpclib reads the whole length a message's
   prefix declares before the codec sees a byte.
"""

from __future__ import annotations

import asyncio
import binascii
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpclib.client
import grpclib.protocol
import grpclib.server
import grpclib.stream
import hyperframe.frame
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes

from pmlb.errors import PmlbError

log = logging.getLogger("pmlb.transport")

# The versions pmlb is tested with (pyproject.toml says the same; a test
# checks). A release outside these may still work, but it is not known to.
SUPPORTED: Final = {
    "grpclib": (">=0.4.9", "<0.5"),
    "h2": (">=4.1", "<5"),
    "hyperframe": (">=6.0", "<7"),
}

# (what, object, attribute) for every internal used below.
INTERNALS: Final = (
    ("hyperframe.frame._raw_data_repr", hyperframe.frame, "_raw_data_repr"),
    ("grpclib.stream.recv_message", grpclib.stream, "recv_message"),
    ("grpclib.client.recv_message", grpclib.client, "recv_message"),
    ("grpclib.server.recv_message", grpclib.server, "recv_message"),
    ("grpclib.client.Stream._maybe_raise", grpclib.client.Stream, "_maybe_raise"),
    ("grpclib.protocol.Connection._ping", grpclib.protocol.Connection, "_ping"),
)


class LibraryChanged(PmlbError):
    """A library moved an internal pmlb's grpclib transport relies on."""


def check() -> None:
    """Raise LibraryChanged when an internal named in INTERNALS is gone."""
    for what, owner, name in INTERNALS:
        if not hasattr(owner, name):
            lib = what.split(".", 1)[0]
            low, high = SUPPORTED[lib]
            raise LibraryChanged(
                f"{lib} {importlib.metadata.version(lib)} has no {what}, which pmlb's grpclib "
                f"transport uses: install {lib}{low},{high}, or run with "
                "--link-transport grpcio (PMLB_LINK_TRANSPORT=grpcio)"
            )


# -- 1. hyperframe's frame repr -------------------------------------------------


def raw_data_repr(data: bytes | None) -> str:
    """hyperframe's repr of a frame body, reading 11 bytes instead of all.

    hyperframe 6.1 hex-encodes the whole body to keep 20 characters: a third
    of the node's CPU in the bulk bench went there. Same output
    (tests/unit/test_libpatch.py compares it with the library's)."""
    if not data:
        return "None"
    r = binascii.hexlify(data[:11]).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


# The library's own, kept for the test that the output is unchanged (reloading
# hyperframe to get it back would make new frame classes that h2 does not know).
LIBRARY_RAW_DATA_REPR: Final = hyperframe.frame._raw_data_repr


# -- 2. SETTINGS_MAX_FRAME_SIZE -------------------------------------------------


def advertise_max_frame(protocol: H2Protocol, size: int) -> H2Protocol:
    """Make ``protocol`` advertise ``size`` as its SETTINGS_MAX_FRAME_SIZE
    once connected (grpclib's connection holds h2's in ``_connection``)."""
    made = protocol.connection_made

    def connection_made(transport: asyncio.BaseTransport) -> None:
        made(transport)
        h2 = protocol.connection._connection
        h2.update_settings({SettingCodes.MAX_FRAME_SIZE: size})
        protocol.connection.flush()

    protocol.connection_made = connection_made  # type: ignore[method-assign]
    return protocol


# -- 3. a keepalive that waits while data moves ----------------------------------


def patient_keepalive(
    protocol: H2Protocol,
    interval: float,
    timeout: float,
    moved: Callable[[], tuple[int, int]],
    min_progress: int,
    peer: str,
) -> None:
    """Replace the keepalive of ``protocol``'s connection (once connected):
    PING every ``interval``; when the answer is not back within ``timeout``
    but ``moved()`` (bytes acknowledged, bytes received) grew by
    ``min_progress`` either way meanwhile, wait another ``timeout`` instead of
    closing. grpclib keeps the ping callback in ``_ping``, its pending close
    in ``_close_by_ping_handler`` and the next ping in ``_ping_handle``."""
    conn = protocol.connection
    loop = asyncio.get_running_loop()
    ping = conn._ping
    # The timer we armed (uvloop's handles do not show their callback) and
    # the bytes moved when it was armed.
    mine: list[Any] = [None, (0, 0)]

    def arm(at: tuple[int, int]) -> None:
        mine[:] = [loop.call_later(timeout, timed_out), at]
        conn._close_by_ping_handler = mine[0]

    def timed_out() -> None:
        conn._close_by_ping_handler = None
        now, before = moved(), mine[1]
        if max(now[0] - before[0], now[1] - before[1]) >= min_progress:
            arm(now)  # the answer is queued behind data that is moving
            return
        log.info("link to %s: keepalive unanswered, no data moving", peer)
        conn.close()

    def patient_ping() -> None:
        ping()
        handler = conn._close_by_ping_handler
        if handler is not None and handler is not mine[0]:
            handler.cancel()  # grpclib's: close at once on timeout
            arm(moved())

    conn._ping = patient_ping  # type: ignore[method-assign]
    if conn._ping_handle is not None:  # the first ping, scheduled before us
        conn._ping_handle.cancel()
        conn._ping_handle = loop.call_later(interval, patient_ping)


# -- 4. reading messages bounded by their length prefix --------------------------

RecvMessage = Callable[[Any, Any, Any], Awaitable[Any]]
LIBRARY_RECV_MESSAGE: Final[RecvMessage] = grpclib.stream.recv_message


def install(recv_message: RecvMessage) -> None:
    """Install the process-wide replacements: the frame repr, and
    ``recv_message`` where grpclib's client and server streams look it up
    (their module globals). Idempotent."""
    check()
    hyperframe.frame._raw_data_repr = raw_data_repr
    grpclib.client.recv_message = recv_message  # type: ignore[attr-defined,assignment]
    grpclib.server.recv_message = recv_message  # type: ignore[attr-defined,assignment]


def raise_status(call: grpclib.client.Stream[Any, Any]) -> None:
    """Raise the GRPCError a finished client call carries in its trailers
    (grpclib keeps that check private: ``_maybe_raise``)."""
    call._maybe_raise()
