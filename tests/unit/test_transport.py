"""Pure parts of pmlb.transport: the codec, the transport names, the progress clock."""

from __future__ import annotations

import pytest

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import ConfigError
from pmlb.transport import TRANSPORTS, check_transport, h2lib, tcpinfo


def test_the_codec_turns_garbage_into_a_value_not_an_error() -> None:
    codec = h2lib._Codec()
    batch = pb.Batch(frames=[pb.Frame(mark="m", data=pb.Data(payload=b"x"))])
    wire = codec.encode(batch, pb.Batch)
    assert codec.decode(wire, pb.Batch) == batch
    assert codec.decode(b"\xff\xff\xff", pb.Batch) is h2lib._GARBAGE


def test_unknown_transport_is_a_config_error() -> None:
    for name in TRANSPORTS:
        assert check_transport(name) == name
    with pytest.raises(ConfigError, match="grpclib, grpcio"):
        check_transport("quic")


def test_link_progress_counts_moving_bytes_but_not_pings() -> None:
    """The hung-upstream watchdog's clock on links (grpclib, nghttp2): a period that
    moves PROGRESS_BYTES either way (a slow link carrying a big Batch) counts
    as life; what pings move (tens of bytes, which a stopped peer's kernel
    acknowledges too) does not, however many periods add up."""
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
        with client, peer:
            # Only the progress clock, not a channel (which wants a loop).
            channel = tcpinfo.Progress()
            channel.attach(client)
            assert channel.last_data() == 0.0
            for _ in range(200):  # 200 "periods" of ping-sized traffic
                client.sendall(b"p" * 40)
                peer.recv(100)
                assert channel.last_data() == 0.0
            before = time.monotonic()
            client.sendall(b"d" * tcpinfo.PROGRESS_BYTES)  # acknowledged by the peer's kernel
            deadline = time.monotonic() + 5
            while channel.last_data() < before and time.monotonic() < deadline:
                time.sleep(0.01)  # the kernel's ACK arrives asynchronously
            assert channel.last_data() >= before
            mark = channel.last_data()
            peer.sendall(b"r" * tcpinfo.PROGRESS_BYTES)  # received counts too
            deadline = time.monotonic() + 5
            while channel.last_data() == mark and time.monotonic() < deadline:
                time.sleep(0.01)
            assert channel.last_data() > mark
