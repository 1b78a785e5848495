"""What the kernel knows about a link's TCP connection (TCP_INFO), for the
link's hung-peer watchdog and the log line that calls a link hung. Shared by
the transports that own their socket (grpclib, nghttp2)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Final

# struct tcp_info (linux/tcp.h, Linux 4.1+): tcpi_bytes_acked (what the peer's
# kernel acknowledged of what we sent) and tcpi_bytes_received, two u64s.
_TCPI_BYTES: Final = struct.Struct("QQ")
_TCPI_BYTES_ACKED: Final = 120
# Bytes one watchdog period must move, either way, to count as a link moving
# data: more than the pings of a period (HTTP/2 PINGs and ours are tens of
# bytes), which a stopped peer's kernel acknowledges and its HTTP/2 library
# may answer.
PROGRESS_BYTES: Final = 4096


class Progress:
    """When a watchdog period last moved PROGRESS_BYTES either way on one
    connection (a slow link carrying a large Batch: seconds without a whole
    message or even a whole frame). Read from the kernel's counters, so the
    receive path does no extra work per frame."""

    __slots__ = ("_moved", "last_progress", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self._moved = (0, 0)
        self.last_progress = 0.0

    def attach(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self._moved = self.moved()

    def moved(self) -> tuple[int, int]:
        """(bytes the peer acknowledged, bytes received) on the connection."""
        sock = self.sock
        if sock is None:
            return self._moved
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
            acked, received = _TCPI_BYTES.unpack_from(info, _TCPI_BYTES_ACKED)
        except (OSError, struct.error):  # not TCP (tests), or an old kernel
            return self._moved
        return int(acked), int(received)

    def last_data(self) -> float:
        """Called once per watchdog period: progress is what this period
        brought, so pings never add up to it."""
        moved = self.moved()
        before = self._moved
        if max(moved[0] - before[0], moved[1] - before[1]) >= PROGRESS_BYTES:
            self.last_progress = time.monotonic()
        self._moved = moved
        return self.last_progress

    def tcp_state(self) -> str:
        """The kernel's view of the connection, for the log line that calls a
        link hung: whether TCP itself is retransmitting, and since when the
        peer has been silent."""
        sock = self.sock
        if sock is None:
            return "not connected"
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError as exc:
            return f"TCP_INFO unavailable ({exc})"
        if len(info) < 104:
            return "TCP_INFO too short"
        (retransmits, probes, backoff) = struct.unpack_from("BBB", info, 2)
        rto, _ato, _smss, _rmss, unacked, _sacked, lost, retrans = struct.unpack_from("8I", info, 8)
        last_sent, _, last_recv, last_ack = struct.unpack_from("4I", info, 44)
        rtt, rttvar = struct.unpack_from("II", info, 68)
        cwnd = struct.unpack_from("I", info, 80)[0]
        total_retrans = struct.unpack_from("I", info, 100)[0]
        return (
            f"tcp: unacked={unacked} lost={lost} retrans={retrans} total_retrans={total_retrans} "
            f"retransmits={retransmits} probes={probes} backoff={backoff} rto={rto / 1000:.0f}ms "
            f"rtt={rtt / 1000:.0f}ms rttvar={rttvar / 1000:.0f}ms cwnd={cwnd} "
            f"last_sent={last_sent}ms last_recv={last_recv}ms last_ack={last_ack}ms"
        )
