"""Property test against a live node: whatever batches an upstream sends (hypothesis
draws them: any frame kind, any mark, oversized payloads, wild credits and acks,
metadata floods, garbage bytes), the node stays up and a bystander's mark keeps
working. Only marks a frame names may be closed."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from tests.conftest import Cluster


class ScriptedUpstream:
    """A sync gRPC upstream: echoes `<mark> <payload>` and sends whatever the test queues."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[bytes | None] = queue.Queue()

    def bridge(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        hello = pb.Batch()
        hello.hello.id = "scripted"
        hello.hello.protocol = 1
        hello.hello.initial_window = 1 << 20
        yield hello.SerializeToString()

        def pump() -> None:
            try:
                for raw in requests:
                    out = pb.Batch()
                    for f in pb.Batch.FromString(raw).frames:
                        if f.HasField("data"):
                            out.frames.add(
                                mark=f.mark,
                                data=pb.Data(
                                    payload=f.mark.encode() + b" " + f.data.payload,
                                    acked=f.data.seq,
                                ),
                            )
                    if out.frames:
                        self.outbox.put(out.SerializeToString())
            except grpc.RpcError:
                pass  # the node ended the stream (the test is over, or it refused a batch)
            finally:
                self.outbox.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while (item := self.outbox.get()) is not None:
            yield item


marks = st.sampled_from(["VICTIM", "n1.aaaaaaaaaaaaa.zz", "", "not a mark", "\u00e9\u00e9"])
frames = st.one_of(
    st.builds(
        lambda m, p, a: pb.Frame(mark=m, data=pb.Data(payload=p, acked=a)),
        marks,
        st.binary(max_size=3000),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(lambda m, r: pb.Frame(mark=m, close=pb.Close(reason=r)), marks, st.text(max_size=30)),
    st.builds(
        lambda m, c, a: pb.Frame(mark=m, flow=pb.Flow(credit=c, acked=a)),
        marks,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        lambda m, kv: pb.Frame(mark=m, meta=pb.Meta(set=kv)),
        marks,
        st.dictionaries(st.text(max_size=20), st.text(max_size=5000), max_size=6),
    ),
    st.builds(lambda m: pb.Frame(mark=m, open=pb.Open(service="x")), marks),
    st.builds(lambda m: pb.Frame(mark=m), marks),
)
payloads = st.one_of(
    st.lists(frames, max_size=20),
    st.binary(max_size=200),  # not a Batch at all
)


def test_arbitrary_upstream_batches_never_hurt_a_bystander(cluster: Cluster) -> None:
    up = ScriptedUpstream()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "pmlb.v1.Upstream", {"Bridge": grpc.stream_stream_rpc_method_handler(up.bridge)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        node = cluster.node([f"s=127.0.0.1:{port}"], extra=["--max-frame", "2048"])
        canary = socket.create_connection(("127.0.0.1", node.port), timeout=5)

        def roundtrip(sock: socket.socket, text: bytes) -> bytes:
            sock.sendall(text + b"\n")
            return sock.recv(4096)

        canary_mark = roundtrip(canary, b"hello").split(b" ")[0]
        victim = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        victim_mark = roundtrip(victim, b"hi").split(b" ")[0].decode()

        @settings(
            max_examples=80,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(payloads)
        def send_anything(drawn: list[pb.Frame] | bytes) -> None:
            if isinstance(drawn, bytes):
                raw = drawn
            else:
                for f in drawn:
                    if f.mark == "VICTIM":
                        f.mark = victim_mark
                raw = pb.Batch(frames=drawn).SerializeToString()
            up.outbox.put(raw)
            assert roundtrip(canary, b"ping") == canary_mark + b" ping\n"

        send_anything()
        assert node.proc.alive()
        m = node.metrics()
        assert m['pmlb_upstream_up{upstream="s"}'] == 1, "the link itself survived"
        assert m["pmlb_garbage_batches_total"] >= 1
        canary.close()
        victim.close()
    finally:
        up.outbox.put(None)
        server.stop(0)
