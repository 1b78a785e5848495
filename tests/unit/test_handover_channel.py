"""The live handover's channel (pmlb.node.handover) on real Unix sockets:
messages and descriptors arrive together, and whatever comes that is not a
message of ours (too long, unparsable, cut short) is a clear HandoverError,
never a hang, an unbounded read or a leaked descriptor."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from pmlb._proto.pmlb.v1 import handover_pb2 as hpb
from pmlb.node.handover import MAX_MESSAGE, Channel, HandoverError, accept_taker
from tests.support import async_wait_until, needs

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _pair() -> tuple[Channel, socket.socket]:
    a, b = socket.socketpair()
    return Channel(a), b


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_message_and_its_descriptors_arrive_together() -> None:
    left, right_sock = _pair()
    right = Channel(right_sock)
    r, w = os.pipe()
    msg = hpb.HandoverMessage()
    msg.marks.marks.add(mark="n1.abc.1", unacked=[hpb.HandedFrame(seq=7, payload=b"x" * 70_000)])
    async with asyncio.timeout(10):
        await left.send(msg, [w])
        got, fds = await right.recv(5)
    os.close(w)
    assert got == msg
    assert len(fds) == 1
    os.write(fds[0], b"through the passed pipe")  # the same pipe, another descriptor
    os.close(fds[0])
    assert os.read(r, 100) == b"through the passed pipe"
    os.close(r)
    left.close()
    right.close()


async def test_an_oversized_length_is_refused_before_reading_it() -> None:
    chan, peer = _pair()
    peer.sendall(struct.pack(">I", MAX_MESSAGE + 1))
    with pytest.raises(HandoverError, match="bound"):
        await chan.recv(5)
    chan.close()
    peer.close()


async def test_garbage_is_refused_and_its_descriptors_closed() -> None:
    chan, peer = _pair()
    r, w = os.pipe()
    body = b"\xff\xff\xff\xff garbage"
    socket.send_fds(peer, [struct.pack(">I", len(body)) + body], [w])
    os.close(w)
    before = _open_fds()
    with pytest.raises(HandoverError, match="does not parse"):
        await chan.recv(5)
    assert _open_fds() == before, "the passed descriptor was closed"
    # ... so the pipe's only writer is gone: its reader sees the end.
    assert os.read(r, 10) == b""
    os.close(r)
    chan.close()
    peer.close()


async def test_a_message_cut_short_is_an_error_not_a_hang() -> None:
    chan, peer = _pair()
    peer.sendall(struct.pack(">I", 100) + b"only ten b")
    peer.close()
    with pytest.raises(HandoverError, match="closed the channel"):
        await chan.recv(5)
    chan.close()


async def test_silence_is_bounded() -> None:
    chan, peer = _pair()
    with pytest.raises(TimeoutError):
        await chan.recv(0.2)
    chan.close()
    peer.close()


@needs(None if os.getuid() == 0 else "runs a process as another user: run as root (CI does)")
async def test_another_user_cannot_reach_a_workers_rendezvous(tmp_path: Path) -> None:
    """The rendezvous socket is the owner's alone (mode 0600, in the node's
    0700 run directory; the peer's uid is checked as well)."""
    await asyncio.to_thread(tmp_path.chmod, 0o755)
    path = str(tmp_path / "handover-0.sock")
    waiting = asyncio.create_task(accept_taker(path, 3.0))
    await async_wait_until(lambda: os.path.exists(path), 5, "the rendezvous socket")
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n"
        "else:\n    print('connected')\n"
    )
    out = await asyncio.to_thread(
        subprocess.run,
        ["/usr/bin/python3", "-c", probe, path],  # the venv's is root's alone
        user=65534,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.strip() == "13", out  # EACCES
    with pytest.raises(HandoverError, match="no successor connected"):
        await waiting
    assert not await asyncio.to_thread(os.path.exists, path), "removed once the wait is over"
