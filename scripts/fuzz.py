"""Coverage-guided fuzzing (atheris/libFuzzer) of pmlb's parsers of untrusted input.

    python scripts/fuzz.py TARGET SECONDS      # one target
    python scripts/fuzz.py all SECONDS         # every target, one process each

Targets: the framing decoders (client bytes), the PROXY header parser
(trusted peers' bytes), the etcd value parsers (operator-typed values), the
Batch decoder (upstream bytes) and the native link transport's receive path
(an upstream's HTTP/2 bytes: libnghttp2 and pmlb's gRPC message cutting; the
fuzz input is a sequence of frames with fuzzed headers and bodies, after the
server's SETTINGS and response HEADERS, so it gets past the preface; libFuzzer
sees no coverage inside the C library, so those runs are random, not guided).
A target fails only on an exception a caller would not expect, which is a bug:
it then becomes a regression test.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["pmlb"]):  # our parsers, not their libraries
    from pmlb.dataplane import framing, proxyproto
    from pmlb.errors import FrameTooLarge, FramingError
    from pmlb.protocol import wire
    from pmlb.store import keys
    from pmlb.transport import ngh2

if ngh2.available():
    import h2.config
    import h2.connection

    from pmlb.transport import _nghttp2


FRAMINGS = [
    "raw",
    "line",
    "len16",
    "len32",
    "mqtt",
    "modbus-tcp",
    "smpp",
    "stomp",
    "length-field:offset=3,size=3,order=little,adjust=-2,strip=0",
    "length-field:size=varint,strip=0",
    "length-field:size=8,strip=8",
    "delimiter:hex=0d0a,keep=yes",
    "delimiter:text=END",
]


def _framing(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name = fdp.PickValueInList(FRAMINGS)
    limit = fdp.ConsumeIntInRange(1, 4096)
    dec = framing.make_decoder(name, limit)
    try:
        while fdp.remaining_bytes():
            for msg in dec.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 512))):
                assert len(msg) <= limit, (name, limit, len(msg))
            # Bounded memory: one partial message (plus a header or a split delimiter).
            assert dec.pending <= limit + 1024 + 16, (name, limit, dec.pending)
    except (FrameTooLarge, FramingError):
        pass


def _proxy(data: bytes) -> None:
    try:
        header, used = proxyproto.parse(data)
    except proxyproto.BadProxyHeader:
        return
    assert 0 <= used <= len(data)
    assert (header is None) == (used == 0)


def _etcd_values(data: bytes) -> None:
    for parse in (keys.parse_upstream, keys.parse_health, keys.parse_node):
        with contextlib.suppress(keys.InvalidValue):
            parse("fuzz", data)


def _batch(data: bytes) -> None:
    batch = wire.parse_batch_lenient(data)
    if batch is not None:
        for f in batch.frames:
            f.WhichOneof("kind")


def _server_preface() -> bytes:
    """An h2 server's SETTINGS and response HEADERS for stream 1."""
    client = _nghttp2.ClientStream(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"), (b":authority", b"a")],
        65535,
        16384,
        1 << 20,
    )
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(b"".join(client.output()))
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    return server.data_to_send()


def _nghttp2_receive(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    client = _nghttp2.ClientStream(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"), (b":authority", b"a")],
        65535,
        16384,
        fdp.ConsumeIntInRange(0, 1 << 16),
    )
    client.output()
    client.receive(PREFACE)
    while fdp.remaining_bytes():
        # A frame: length from its body, a fuzzed type, flags and stream.
        kind, flags = fdp.ConsumeIntInRange(0, 10), fdp.ConsumeIntInRange(0, 255)
        stream = fdp.PickValueInList([0, 1, 1, 1, 3, 2**31 - 1])
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        frame = len(body).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
        client.receive(frame + body)
        while (taken := client.take()) is not None:
            client.consume(taken[1])
        client.output()
        if client.local_error:
            return  # a GOAWAY went back: the connection is done


PREFACE = _server_preface() if ngh2.available() else b""

TARGETS: dict[str, Callable[[bytes], None]] = {
    "framing": _framing,
    "proxy": _proxy,
    "etcd-values": _etcd_values,
    "batch": _batch,
    "nghttp2": _nghttp2_receive,
}


def main() -> int:
    target, seconds = sys.argv[1], sys.argv[2]
    if target == "all":
        failed = 0
        for name in TARGETS:
            rc = subprocess.call([sys.executable, __file__, name, seconds])
            print(f"fuzz {name}: {'ok' if rc == 0 else f'FAILED ({rc})'}", flush=True)
            failed += rc != 0
        return 1 if failed else 0
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=1024"], TARGETS[target]
    )
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
