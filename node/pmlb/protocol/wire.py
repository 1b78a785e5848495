"""Shared Bridge-stream machinery used by both ends: message types, close
reasons, lenient decoding and the batch writer.

Both the node (dataplane.link) and the upstream SDK (upstream.sdk) write frames
through a BatchWriter: frames are appended to the current Batch as they are
produced, and one writer task per stream sends whatever has accumulated each
time the previous write completes. At low load a frame leaves on the next loop
iteration (no added latency); under load batches fill up by themselves while
a write is in flight, which is what makes one gRPC message carry many frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from google.protobuf.message import DecodeError

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.errors import PmlbError

Batch = pb.Batch
Frame = pb.Frame
Hello = pb.Hello

# Protocol 2 added Ping frames and the per-frame credit charge (FRAME_OVERHEAD).
# A peer that says 1 gets neither: no pings, credit counts payload bytes only.
PROTOCOL_VERSION: Final = 2
DEFAULT_WINDOW: Final = 262_144
# Every Data frame costs its payload length plus this many bytes: in credit
# (protocol 2 peers, both directions), in the node's replay bound, link buffer
# and client write bound, and in the SDK's outgoing queue. Without it an empty
# message costs nothing and a flood of them grows memory without bound; 64 is
# about what one frame costs in Python objects on each side (a replay entry, a
# protobuf sub-message), so a 256 KiB window holds at most 4,096 empty frames.
FRAME_OVERHEAD: Final = 64


def frame_overhead(peer_protocol: int) -> int:
    """The per-frame credit charge agreed with a peer speaking ``peer_protocol``."""
    return FRAME_OVERHEAD if peer_protocol >= 2 else 0


BRIDGE_METHOD: Final = "/pmlb.v1.Upstream/Bridge"
# A Batch is cut when it holds this many frames or payload bytes; gRPC's own
# message limit is set well above the byte bound (see GRPC_MAX_MESSAGE).
MAX_BATCH_FRAMES: Final = 1024
MAX_BATCH_BYTES: Final = 1 << 20
GRPC_MAX_MESSAGE: Final = 64 << 20
# The most payload one held Batch (BatchWriter.hold, the SDKs' atomic()) may
# carry: half of what a peer accepts in one message, leaving room for framing.
MAX_ATOMIC_BYTES: Final = GRPC_MAX_MESSAGE // 2

log = logging.getLogger("pmlb.wire")


def parse_batch_lenient(data: bytes) -> pb.Batch | None:
    """Deserializer for received Batches that never raises.

    grpc aborts the whole stream when a deserializer raises; one unparseable
    message from a buggy peer must not take every mark on the link with it, so
    garbage becomes None and the reader counts and drops it.
    """
    try:
        return pb.Batch.FromString(data)
    except DecodeError:
        return None


class StreamEnded(PmlbError):
    """The peer ended the Bridge stream."""


def serialize_batch(batch: pb.Batch) -> bytes:
    return batch.SerializeToString()


class BatchWriter:
    """Coalesces frames into Batches and writes them on one stream, in order.

    ``frame()`` returns a new Frame already appended to the open batch; the
    caller fills it in and calls ``kick()`` once per burst. ``pending_bytes``
    (payload bytes not yet handed to gRPC) is what callers use for
    link-level backpressure.
    """

    __slots__ = (
        "_batch",
        "_closed",
        "_count",
        "_full",
        "_held",
        "_on_drain",
        "_open_bytes",
        "_swaps",
        "_task",
        "_wake",
        "_write",
        "batches_sent",
        "cuts",
        "frames_sent",
        "pending_bytes",
    )

    def __init__(
        self,
        write: Callable[[pb.Batch], Awaitable[None]],
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._on_drain = on_drain
        self._batch = pb.Batch()
        self._count = 0
        self._open_bytes = 0
        # hold(): the open batch is not cut, so frames made until release()
        # reach the peer in one Batch (applied whole or not at all). _swaps
        # counts open batches taken by the writer task, to catch an await
        # inside a hold.
        self._held = 0
        self._swaps = 0
        self._full: deque[tuple[pb.Batch, int]] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.pending_bytes = 0
        self.batches_sent = 0
        self.cuts = 0  # batches cut because they were full (the rest flushed when idle)
        self.frames_sent = 0

    @property
    def current(self) -> pb.Batch:
        """The batch being filled (to set ``hello`` before the first write)."""
        return self._batch

    @property
    def open_bytes(self) -> int:
        """Payload bytes in the batch being filled."""
        return self._open_bytes

    def hold(self) -> int:
        """Keep every frame made from now until release() in one Batch; the
        caller must not await in between. Returns the token for release()."""
        self._held += 1
        return self._swaps

    def release(self, token: int) -> None:
        self._held -= 1
        if self._swaps != token:
            raise RuntimeError(
                "frames held for one Batch were sent in several: "
                "an await between hold() and release()"
            )

    def frame(self) -> pb.Frame:
        if self._count >= MAX_BATCH_FRAMES and not self._held:
            self._cut()
        self._count += 1
        return self._batch.frames.add()

    def add_payload(self, size: int) -> None:
        """Account ``size`` payload bytes just put in a frame of the open batch."""
        self.pending_bytes += size
        self._open_bytes += size
        if self._open_bytes >= MAX_BATCH_BYTES and not self._held:
            self._cut()

    def _cut(self) -> None:
        self.cuts += 1
        self._full.append((self._batch, self._open_bytes))
        self._batch = pb.Batch()
        self._count = 0
        self._open_bytes = 0

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")
        return self._task

    async def _run(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            while self._full or self._count or self._batch.HasField("hello"):
                if self._full:
                    batch, size = self._full.popleft()
                else:
                    batch, size = self._batch, self._open_bytes
                    self._swaps += 1
                    self._batch = pb.Batch()
                    self._count = 0
                    self._open_bytes = 0
                n = len(batch.frames)
                await self._write(batch)
                self.pending_bytes -= size
                self.batches_sent += 1
                self.frames_sent += n
            if self._on_drain is not None:
                self._on_drain()
            if self._closed:
                return

    async def close(self, timeout: float) -> None:
        """Flush what is pending (bounded by ``timeout``), then stop the task."""
        self._closed = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
        except asyncio.CancelledError:
            task.cancel()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller is being cancelled: that must not be swallowed
        except Exception as exc:  # the stream broke: nothing more to flush
            log.debug("batch writer ended with %r", exc)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
