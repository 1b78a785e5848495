"""Hostile input at the admin trust boundary, generated (hypothesis), against
real sockets (security review, "Done when": a fuzz or property test drives
the admin server and the cluster page's scrape with malformed HTTP, huge and
slow bodies, NaN/Inf and deep JSON; each ends in a bounded error, never a
crash or a hang).

* The admin server of a real node (with an admin token the hostile side never
  has): every request gets an HTTP answer from the known set, or the
  connection closed, within the request timeout; afterwards the node is alive,
  ready (nothing drained it) and logged no traceback.
* The cluster page's scrape (``pmlb.commands.admin._scrape``, as ``pmlb status`` and
  ``pmlb dashboard`` call it) against a listener that answers whatever
  hypothesis makes: it returns numbers or a reason within its total bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlb.commands.admin import _scrape
from pmlb.observability.admin import REQUEST_TIMEOUT
from pmlb.observability.scrape import SCRAPE_TIMEOUT
from tests.conftest import Cluster, default_workers_too
from tests.support import http_get

TOKEN = "fuzz-admin-t0ken"
# Answers the admin server gives (anything else is a bug); 500 only if a
# route handler failed, which must not happen either (asserted apart).
STATUSES = {200, 400, 401, 403, 404, 405, 413, 421, 431, 503}
PATHS = [
    "/connections", "/api/mark", "/api/mark/close", "/drain", "/", "/dashboard", "/healthz",
    "/readyz", "/metrics", "/api/status", "/pmlb.css", "/pmlb.js", "/nope", "//", "*",
    "/api/mark/", "/../etc/passwd", "/%2e%2e/", "",
]  # fmt: skip
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "get", "G\x00T", ""]
HEADER_NAMES = [
    "Host", "Origin", "Sec-Fetch-Site", "Authorization", "Content-Length", "Transfer-Encoding",
    "Cookie", "X-Forwarded-For", "Connection", "Expect",
]  # fmt: skip

_text = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=300)
_query = st.one_of(
    st.just(""),
    st.builds(
        lambda k, v: f"?{k}={v}",
        st.sampled_from(["mark", "after", "limit", "q", "mark[]", ""]),
        st.one_of(
            st.sampled_from(["n1.aaaaaaaaaaaaa.1", "-1", "99999999999999999999", "%ff%fe", "NaN"]),
            _text.map(lambda t: t.replace(" ", "%20")),
        ),
    ),
)
_header_value = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1", "evil.example", "[::1]:1", ":::", "Bearer wrong", "Bearer " + "x" * 9000,
            "-1", "18446744073709551616", "chunked", "null", "cross-site", "100-continue", "",
        ]
    ),
    _text,
)  # fmt: skip
_request = st.builds(
    lambda method, path, query, version, headers, body, sep: (
        f"{method} {path}{query}{version}".encode("latin-1", "replace")
        + b"".join(f"\r\n{k}{sep}{v}".encode("latin-1", "replace") for k, v in headers)
        + b"\r\n\r\n"
        + body
    ),
    # Mostly the methods routes take, so that requests reach them.
    st.one_of(
        st.sampled_from(["GET", "POST"]),
        st.sampled_from(METHODS),
        _text.filter(lambda t: " " not in t),
    ),
    st.sampled_from(PATHS),
    _query,
    st.sampled_from([" HTTP/1.1", " HTTP/1.0", " HTTP/9", "", " HTTP/1.1 extra"]),
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), _header_value), max_size=8),
    st.one_of(st.just(b""), st.binary(max_size=2048), st.just(b"x" * 70000)),
    st.sampled_from([": ", ":", " : ", "\x00"]),
)


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request``; everything the server sends until it closes. Fails
    when the server keeps the connection past the request timeout."""
    deadline = time.monotonic() + REQUEST_TIMEOUT + 2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # Closed before all of it was read: an answer in itself.
        with contextlib.suppress(OSError):
            s.sendall(request)
        out = b""
        while True:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            except TimeoutError:
                raise AssertionError(f"no close within the bound after {request[:120]!r}") from None
            if not chunk:
                return out
            out += chunk


@default_workers_too
def test_hostile_requests_get_a_bounded_answer(cluster: Cluster, workers: int) -> None:
    up = cluster.echo("u1")
    node = cluster.node([f"u1={up.addr}"], env={"PMLB_ADMIN_TOKEN": TOKEN})
    seen: dict[int, int] = {}

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,  # the same requests in CI as here
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_request)
    def one(request: bytes) -> None:
        out = _exchange(node.admin, request)
        if out:
            assert out.startswith(b"HTTP/1.1 "), out[:200]
            status = int(out[9:12])
            assert status in STATUSES, (status, request[:200])
            seen[status] = seen.get(status, 0) + 1

    one()
    # The bounded waits the generator does not make (each costs the timeout):
    # a head never finished, and a slow one (a byte a second).
    with socket.create_connection(("127.0.0.1", node.admin), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(REQUEST_TIMEOUT + 3)
        assert s.recv(100) == b"", "an unfinished head is closed at the request timeout"
    with socket.create_connection(("127.0.0.1", node.admin), timeout=5) as s:
        t0 = time.monotonic()
        s.settimeout(0.5)
        closed = False
        for byte in b"GET /metrics HTTP/1.1\r\nHost: slow\r\n":
            try:
                s.sendall(bytes([byte]))
                if s.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a slow head is closed, not waited on byte by byte"
        assert time.monotonic() - t0 < REQUEST_TIMEOUT + 3
    assert node.proc.alive(), node.proc.log()
    assert http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 200, "nothing drained it"
    log = node.proc.log()
    assert "Traceback" not in log, log[-3000:]
    assert seen.get(200, 0) > 0, seen  # the generator reaches real routes too
    assert seen.get(401, 0) > 0, seen  # and the protected ones, refused


# -- the cluster page's scrape ---------------------------------------------------

_metric_value = st.one_of(
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e309", "-1", "0x10", "1_000", "", "nan"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)
_metrics_text = st.lists(
    st.builds(
        lambda name, labels, value: f"{name}{labels} {value}",
        st.sampled_from(
            ["pmlb_marks_open", "pmlb_connections_accepted_total", "pmlb_frames_in_total",
             'pmlb_upstream_marks{upstream="u1"}', "# TYPE pmlb_marks_open gauge", "#", "x y z"]
        ),
        st.sampled_from(["", '{a="1"}', '{a="', "{}", '{a="\\n"}']),
        _metric_value,
    ),
    max_size=20,
).map("\n".join)  # fmt: skip
_answer = st.builds(
    lambda status, headers, body: (
        status.encode("latin-1", "replace")
        + b"".join(f"\r\n{h}".encode("latin-1", "replace") for h in headers)
        + b"\r\n\r\n"
        + body
    ),
    st.sampled_from(
        ["HTTP/1.1 200 OK", "HTTP/1.0 200", "HTTP/1.1 302 Found", "HTTP/1.1 xyz", "SSH-2.0", ""]
    ),
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "Content-Length: 5",
                    "Content-Length: -1",
                    "Content-Length: 99999999999",
                    "Transfer-Encoding: chunked",
                    "Location: http://127.0.0.9/",
                    "Content-Length",
                ]
            ),
            _text,
        ),
        max_size=4,
    ),
    st.one_of(
        _metrics_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=4096)
    ),
)


def test_the_scrape_of_a_hostile_node_ends_in_numbers_or_a_reason() -> None:
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(_answer)
    def one(answer: bytes) -> None:
        async def run() -> None:
            async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await r.readuntil(b"\r\n\r\n")
                w.write(answer)
                await w.drain()
                w.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT + 2):
                    metrics, why = await _scrape(f"127.0.0.1:{port}")
            finally:
                server.close()
            if metrics is None:
                assert why, "a reason for every failure"
            else:
                assert not why
                assert all(type(v) in (int, float) for v in metrics.values()), metrics

        asyncio.run(run())

    one()


@pytest.mark.parametrize("depth", [100, 3000, 100_000])
def test_deep_json_in_a_node_value_is_refused_not_raised(depth: int) -> None:
    from pmlb.store.keys import InvalidValue, parse_node

    with pytest.raises(InvalidValue):
        parse_node("n1", ('{"a":' * depth + "1" + "}" * depth).encode())
    with pytest.raises(InvalidValue):
        parse_node("n1", ("[" * depth + "]" * depth).encode())
