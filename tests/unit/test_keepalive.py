"""--client-keepalive: the socket options it becomes."""

from __future__ import annotations

import socket

from pmlb.dataplane.acceptor import keepalive_options


def test_keepalive_gives_up_at_one_and_a_half_times_the_idle_time() -> None:
    opts = {(level, name): value for level, name, value in keepalive_options(60.0)}
    assert opts[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] == 1
    idle = opts[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)]
    interval = opts[(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)]
    probes = opts[(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)]
    assert (idle, interval, probes) == (60, 10, 3)
    assert opts[(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)] == 90_000


def test_short_settings_stay_whole_seconds_and_valid() -> None:
    for idle in (0.4, 1.0, 2.0, 5.5):
        opts = {name: value for _, name, value in keepalive_options(idle)}
        assert opts[socket.TCP_KEEPIDLE] >= 1
        assert opts[socket.TCP_KEEPINTVL] >= 1
        # Every option is one the kernel takes on a real TCP socket.
        with socket.socket() as s:
            for level, name, value in keepalive_options(idle):
                s.setsockopt(level, name, value)
