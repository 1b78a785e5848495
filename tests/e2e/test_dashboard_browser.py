"""The node's dashboard in a real browser (Debian's chromium, driven by Selenium
through chromium-driver) against a real node, etcd and two upstreams.

What an operator relies on: the page lists the node and both upstreams with
their health, updates without a reload, finds a new client's mark, shows a
closed mark's reason, and closes a mark after a confirmation.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, Etcd
from tests.support import ROOT, Proc, free_port, http_get, needs, tcp_open, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = needs(
    None
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
    else "Debian's chromium and chromium-driver are not installed: apt-get install chromium "
    "chromium-driver (.ci/run does)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,1400")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


class _Receiver:
    """A real OTLP/gRPC trace receiver (what Jaeger's collector port does):
    the trace id of each span named ``pmlb.connection``, by its mark."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsp
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsg

        self.traces: dict[str, str] = {}
        receiver = self

        class Servicer(tsg.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: object, context: object) -> object:
                for rs in request.resource_spans:  # type: ignore[attr-defined]
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            attrs = {a.key: a.value.string_value for a in sp.attributes}
                            if "pmlb.mark" in attrs:
                                receiver.traces.setdefault(attrs["pmlb.mark"], sp.trace_id.hex())
                return tsp.ExportTraceServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(2))
        tsg.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.endpoint = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def otlp() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.server.stop(0)


def _node_row(d: object, name: str) -> str:
    """The value cell of the node page's row called ``name`` ("" if absent)."""
    from selenium.webdriver.common.by import By

    for tr in d.find_elements(By.CSS_SELECTOR, "#node tbody tr"):  # type: ignore[attr-defined]
        cells = tr.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text == name:
            return str(cells[1].text)
    return ""


def _client(port: int) -> tuple[socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"hi\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(200)
        assert chunk, "closed before answering"
        line += chunk
    return s, line.split()[0].decode()


def test_the_dashboard_in_a_browser(
    browser: object, cluster: Cluster, etcd: Etcd, tmp_path: Path, otlp: _Receiver
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    etcd.put("/services/echo/upstreams/u2", u2.addr)
    node = cluster.node(
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1", "u2"],
        extra=["--trace-url", "http://jaeger.example:16686/trace/{trace_id}"],
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    # The page re-renders its tables every 2 s: an element found just before may be gone.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))

    driver.get(f"http://127.0.0.1:{node.admin}/dashboard")  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "node-id"), "n1"))
    for uid in ("u1", "u2"):
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#upstreams tbody"), uid))
    # Health as the checker wrote it, live: no reload between these.
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#upstreams tbody"), "SERVING"))

    # A new client's mark is found by search, with its node and upstream.
    sock, mark = _client(node.port)

    # The live numbers follow without a reload.
    wait.until(lambda d: _node_row(d, "marks open") == "1")
    # A node of several workers shows each (the default here: one per CPU).
    if os.environ.get("PMLB_WORKERS") == "0":
        wait.until(
            lambda d: "w0: " in _node_row(d, "workers") and "w1: " in _node_row(d, "workers")
        )
    box = driver.find_element(By.ID, "q")  # type: ignore[attr-defined]
    box.clear()
    box.send_keys(mark)
    driver.find_element(By.CSS_SELECTOR, "#search button").click()  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#mark h3"), mark))
    detail = driver.find_element(By.ID, "mark").text  # type: ignore[attr-defined]
    assert "node n1" in detail
    assert "upstream u" in detail
    # --trace-url: the mark links to its trace, the one the receiver got.
    link = driver.find_element(By.CSS_SELECTOR, "#mark h3 a")  # type: ignore[attr-defined]
    wait_until(lambda: mark in otlp.traces, 20, "the mark's span exported")
    assert link.get_attribute("href") == (f"http://jaeger.example:16686/trace/{otlp.traces[mark]}")
    driver.save_screenshot(str(tmp_path / "dashboard.png"))  # type: ignore[attr-defined]

    # Close it from the page: a confirmation, then the reason, and the client is gone.
    driver.find_element(By.ID, "close-mark").click()  # type: ignore[attr-defined]
    wait.until(ec.alert_is_present())
    driver.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "close-reason"), "closed_by_api"))
    sock.settimeout(10)
    assert sock.recv(100) == b"", "the client was disconnected"
    sock.close()

    # A client that leaves by itself: its mark shows client_closed.
    other, gone = _client(node.port)
    other.close()
    box = driver.find_element(By.ID, "q")  # type: ignore[attr-defined]

    def closed_reason_shown(d: object) -> bool:
        box.clear()
        box.send_keys(gone)
        d.find_element(By.CSS_SELECTOR, "#search button").click()  # type: ignore[attr-defined]
        return "client_closed" in d.find_element(By.ID, "mark").text  # type: ignore[attr-defined]

    wait.until(closed_reason_shown)
    driver.save_screenshot(str(tmp_path / "dashboard-closed.png"))  # type: ignore[attr-defined]
    if os.environ.get("PMLB_UPDATE_SCREENSHOTS"):  # the README's picture
        shutil.copy(tmp_path / "dashboard.png", ROOT / "scripts" / "screenshots" / "dashboard.png")


def test_the_cluster_dashboard_in_a_browser(
    browser: object, cluster: Cluster, etcd: Etcd, tmp_path: Path
) -> None:
    """`pmlb dashboard --etcd`: both nodes and upstreams listed with the checker,
    a mark found on the node that owns it, and an upstream drained from the page
    (it shows draining and new marks go elsewhere)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    etcd.put("/services/echo/upstreams/u2", u2.addr)
    dns = f"/skydns{etcd.prefix}"
    nodes = [
        cluster.node(
            [],
            node_id=f"n{i}",
            etcd=etcd.url,
            prefix=etcd.prefix,
            wait_links=["u1", "u2"],
            extra=["--dns-name", "lb.test", "--dns-prefix", dns],
        )
        for i in (1, 2)
    ]
    port = free_port()
    args = ["dashboard", "--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--dns-prefix", dns]
    dash = Proc("dashboard", [*args, "--listen", f"127.0.0.1:{port}"], cluster.log_dir)
    cluster.procs.append(dash)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not dash.alive(), 20, "dashboard up")
    assert dash.alive(), dash.log()
    # The page re-renders its tables every 2 s: an element found just before may be gone.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))

    driver.get(f"http://127.0.0.1:{port}/")  # type: ignore[attr-defined]
    for text in ("n1", "n2"):
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#nodes tbody"), text))
    for uid in ("u1", "u2"):
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".upstreams"), uid))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".checker").text in ("n1", "n2"))  # type: ignore[attr-defined]
    # Each upstream's link as each node sees it, and the DNS records published.
    for text in ("n1: up", "n2: up"):
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".upstreams"), text))
    for text in ("lb.test", "n1", "n2"):
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#dns tbody"), text))

    sock, mark = _client(nodes[1].port)
    box = driver.find_element(By.ID, "q")  # type: ignore[attr-defined]
    box.send_keys(mark)
    driver.find_element(By.CSS_SELECTOR, "#search button").click()  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "mark"), "node n2"))
    sock.close()

    def u1_row(d: object) -> str:
        for tr in d.find_elements(By.CSS_SELECTOR, ".upstreams tbody tr"):  # type: ignore[attr-defined]
            if tr.find_element(By.TAG_NAME, "td").text == "u1":
                return str(tr.text)
        return ""

    def click_drain(d: object) -> bool:
        d.find_element(By.CSS_SELECTOR, 'button[data-id="u1"]').click()  # type: ignore[attr-defined]
        return True

    wait.until(click_drain)
    wait.until(ec.alert_is_present())
    driver.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(lambda d: "draining" in u1_row(d))
    driver.save_screenshot(str(tmp_path / "cluster.png"))  # type: ignore[attr-defined]
    assert '"drain": true' in (etcd.get("/services/echo/upstreams/u1") or "")

    def one_round() -> set[str]:
        """Upstreams that answered 6 new clients on each node."""
        served = set()
        for n in nodes:
            for _ in range(6):
                with socket.create_connection(("127.0.0.1", n.port), timeout=10) as s:
                    s.sendall(b"who\n")
                    served.add(s.recv(200).split()[1].decode())
        return served

    # The nodes follow etcd's watch: soon every new mark goes to u2.
    wait_until(lambda: one_round() == {"u2"}, 15, "new marks avoiding the drained u1")

    # Undrain from the page: the same button, now "undrain"; u1 takes marks again.
    wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, 'button[data-id="u1"]').text == "undrain"  # type: ignore[attr-defined]
    )
    wait.until(click_drain)
    wait.until(ec.alert_is_present())
    driver.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(lambda d: "draining" not in u1_row(d) and "u1" in u1_row(d))
    from pmlb.store.keys import parse_upstream

    value = etcd.get("/services/echo/upstreams/u1") or ""
    assert not parse_upstream("u1", value.encode()).drain, value
    wait_until(lambda: "u1" in one_round(), 15, "new marks reaching the undrained u1")


def test_the_node_page_asks_for_the_token_finds_by_address_and_drains(
    browser: object, cluster: Cluster, tmp_path: Path
) -> None:
    """With --admin-token (here PMLB_ADMIN_TOKEN), the page asks for the token
    once, on the first call that needs it; a search by client address lists
    the client's mark; the drain button asks for confirmation, then the node
    drains (not ready, no new clients) while its client is still served."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    u1 = cluster.echo("u1")
    node = cluster.node(
        [f"u1={u1.addr}"], env={"PMLB_ADMIN_TOKEN": "s3cret"}, extra=["--drain-timeout", "60"]
    )
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
    sock, mark = _client(node.port)
    driver.get(f"http://127.0.0.1:{node.admin}/dashboard")  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "node-id"), "n1"))

    box = driver.find_element(By.ID, "q")  # type: ignore[attr-defined]
    box.send_keys("127.0.0.1")  # a client address: every open mark from it
    driver.find_element(By.CSS_SELECTOR, "#search button").click()  # type: ignore[attr-defined]
    wait.until(ec.alert_is_present())  # /connections needs the token: asked once
    alert = driver.switch_to.alert  # type: ignore[attr-defined]
    alert.send_keys("s3cret")
    alert.accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "marks"), mark))

    driver.find_element(By.ID, "drain-node").click()  # type: ignore[attr-defined]
    wait.until(ec.alert_is_present())  # the confirmation
    driver.switch_to.alert.accept()  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "draining requested"))
    wait_until(lambda: http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 503, 10, "draining")
    sock.sendall(b"still\n")
    assert sock.recv(200).endswith(b" u1 still\n"), "its client is served while it drains"
    sock.close()


def test_the_node_page_shows_a_live_handover(
    browser: object, cluster: Cluster, tmp_path: Path
) -> None:
    """After SIGUSR2 the page (served by the successor now) says which process
    serves and what the handover moved."""
    import json
    import signal

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    u1 = cluster.echo("u1")
    node = cluster.node([f"u1={u1.addr}"])
    sock, mark = _client(node.port)
    node.proc.signal(signal.SIGUSR2)

    def successor() -> int:
        status = json.loads(http_get(f"http://127.0.0.1:{node.admin}/api/status")[1])["node"]
        taken = status["handover"]["state"] == "taken" and status["pid"] != node.proc.pid
        return int(status["pid"]) if taken else 0

    pid = int(wait_until(successor, 30, "the successor took over"))  # type: ignore[call-overload]
    try:
        assert node.proc.proc.wait(30) == 0
        wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(f"http://127.0.0.1:{node.admin}/dashboard")  # type: ignore[attr-defined]

        wait.until(lambda d: _node_row(d, "live handover").startswith("taken: 1 marks in"))
        assert _node_row(driver, "process") == f"pid {pid}"
        assert _node_row(driver, "state") == "serving"
        driver.save_screenshot(str(tmp_path / "dashboard-handover.png"))  # type: ignore[attr-defined]
        sock.sendall(b"still\n")  # and the client is still there, with its mark
        assert sock.recv(200).startswith(mark.encode() + b" ")
    finally:
        sock.close()
        os.kill(pid, signal.SIGTERM)
