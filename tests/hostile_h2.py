"""A hostile HTTP/2 gRPC peer, written on the h2 state machine (no gRPC
library to tidy up what it sends): one Bridge message whose 5-byte length
prefix declares far more than GRPC_MAX_MESSAGE, then as much of it as the
other side's flow control lets through.

``flood_as_client`` dials a Bridge server (an SDK upstream); ``FloodServer``
is a Bridge server a node dials as its upstream. Each reports how the flood
ended: ``sent`` all of it, ``reset`` (the stream was refused), ``closed``
(the connection), or ``stalled`` (the other side stopped granting window,
which also bounds its memory)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol.wire import BRIDGE_METHOD, PROTOCOL_VERSION

PIECE = 1 << 16
STALL = 5.0  # no window for this long: the peer stopped reading


@dataclass
class Flood:
    sent: int = 0
    ended: str = ""


def _pump(
    sock: socket.socket,
    conn: h2.connection.H2Connection,
    sid: int,
    declared: int,
    total: int,
    preamble: bytes = b"",
) -> Flood:
    """Send ``preamble``, the prefix and ``total`` body bytes on stream
    ``sid``, as flow control allows, reading what the peer sends meanwhile."""
    out = Flood()
    head = preamble + b"\0" + declared.to_bytes(4, "big")
    zeros = bytes(PIECE)
    last_progress = time.monotonic()
    sock.settimeout(0.2)
    try:
        while out.sent < total + len(head):
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window > 0:
                n = min(window, total + len(head) - out.sent, PIECE)
                chunk = (head[out.sent :] + zeros)[:n] if out.sent < len(head) else zeros[:n]
                conn.send_data(sid, chunk)
                sock.sendall(conn.data_to_send())
                out.sent += n
                last_progress = time.monotonic()
                continue
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                if time.monotonic() - last_progress > STALL:
                    out.ended = "stalled"
                    return out
                continue
            if not data:
                out.ended = "closed"
                return out
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    out.ended = "reset"
                    return out
                if isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    out.ended = "ended by the peer"
                    return out
                if isinstance(ev, h2.events.ConnectionTerminated):
                    out.ended = "closed"
                    return out
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
        out.ended = "closed"
        return out
    out.ended = "sent"
    return out


def _bridge_request(addr: str) -> list[tuple[str, str]]:
    """The HEADERS of a Bridge call, as any gRPC client sends them."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", BRIDGE_METHOD),
        (":authority", addr),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def flood_as_client(addr: str, declared: int, total: int) -> Flood:
    """Open a Bridge stream to ``addr`` with no credentials and flood it."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _bridge_request(addr))
        sock.sendall(conn.data_to_send())
        return _pump(sock, conn, sid, declared, total)


def hello_message(upstream_id: str) -> bytes:
    """An upstream's Hello as one gRPC message (prefix and Batch)."""
    batch = pb.Batch()
    batch.hello.id = upstream_id
    batch.hello.protocol = PROTOCOL_VERSION
    body = batch.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


class FloodServer:
    """A Bridge server on 127.0.0.1 that answers the first stream a node
    opens with a proper Hello, then the flood; ``result`` is set when it is
    over."""

    def __init__(self, declared: int, total: int) -> None:
        self.declared, self.total = declared, total
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.result: Flood | None = None
        self.done = threading.Event()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(60)
        try:
            sock, _ = self.sock.accept()
        except OSError:
            self.done.set()
            return
        with sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            sock.settimeout(30)
            sid = None
            while sid is None:
                data = sock.recv(1 << 16)
                if not data:
                    self.done.set()
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        headers = dict(ev.headers)
                        if headers.get(b":path", b"").decode() == BRIDGE_METHOD:
                            sid = ev.stream_id
                sock.sendall(conn.data_to_send())
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            sock.sendall(conn.data_to_send())
            self.result = _pump(sock, conn, sid, self.declared, self.total, hello_message("u1"))
            self.done.set()
            # Hold the connection (answering pings) until closed: the node must
            # deal with the message, not with a lost connection.
            sock.settimeout(0.2)
            while not self.closing.is_set():
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    conn.receive_data(data)
                    sock.sendall(conn.data_to_send())
                except (OSError, h2.exceptions.ProtocolError):
                    break
        self.done.set()

    def close(self) -> None:
        self.closing.set()
        self.sock.close()
        self.thread.join(10)


def rss(pids: list[int]) -> int:
    """Resident bytes of ``pids`` together (a node and its workers)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakRss:
    """Samples the RSS of ``pids()`` every 50 ms until stopped: the peak."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.base = rss(pids())
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pids()))

    def growth(self) -> int:
        self.stop.set()
        self.thread.join(5)
        return self.peak - self.base


def silent_streams(
    addr: str, n: int, per_conn: int = 64, wait: float = 3.0
) -> tuple[dict[str, int], list[socket.socket]]:
    """Open ``n`` Bridge streams that send nothing (HEADERS only), ``per_conn``
    on each connection; for ``wait`` seconds collect how streams were ended
    (grpc-status -> count). The connections stay open, holding the streams
    that were not ended: the caller closes them."""
    host, port = addr.rsplit(":", 1)
    conns: list[tuple[socket.socket, h2.connection.H2Connection]] = []
    for start in range(0, n, per_conn):
        sock = socket.create_connection((host, int(port)), timeout=10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(min(per_conn, n - start)):
            conn.send_headers(conn.get_next_available_stream_id(), _bridge_request(addr))
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.05)
        conns.append((sock, conn))
    ended: dict[str, int] = {}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for sock, conn in conns:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                continue
            if not data:
                continue
            for ev in conn.receive_data(data):
                headers = getattr(ev, "headers", None)
                if headers:
                    status = dict(headers).get(b"grpc-status")
                    if status is not None:
                        key = status.decode()
                        ended[key] = ended.get(key, 0) + 1
            sock.sendall(conn.data_to_send())
    return ended, [sock for sock, _ in conns]
