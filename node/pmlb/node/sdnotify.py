"""systemd's readiness protocol (sd_notify), without a dependency.

With ``Type=notify`` systemd reports the unit active, and starts what is
ordered after it, only once the node says ``READY=1``: listening, and
registered in etcd in cluster mode (what ``/readyz`` calls registered). On
the way down it says ``STOPPING=1``. Each is one datagram to the Unix socket
``$NOTIFY_SOCKET`` names (``@`` for an abstract one); without the variable,
nothing is sent. Only the process systemd started speaks: a node's workers
do not inherit the variable (``pmlb.node.workers``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

log = logging.getLogger("pmlb.sdnotify")

ENV: Final = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not asked to."""
    path = os.environ.get(ENV)
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:  # systemd gone or a wrong path: say so, serve anyway
        log.warning("could not tell systemd %s at %s: %s", state, path, exc)
        return False
    log.info("told systemd %s", state)
    return True


class ReadyOnce:
    """``READY=1`` the first time it is called: as a session's ``on_new_lease``
    callback, added after the registration's, it runs once the node's key is
    in etcd; without etcd, call it once listening."""

    def __init__(self, main_pid: bool = False) -> None:
        self.sent = False
        # A successor after a live handover (pmlb.node.handover) tells systemd
        # it is the service's main process now (needs NotifyAccess=all).
        self.main_pid = main_pid

    async def __call__(self, lease: int = 0) -> None:
        if not self.sent:
            self.sent = True
            notify(f"MAINPID={os.getpid()}\nREADY=1" if self.main_pid else "READY=1")
