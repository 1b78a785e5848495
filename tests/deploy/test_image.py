"""`make test-deploy`: the image, built and run as an operator would.

Builds the pmlb and etcd images (scripts/image/build.sh, no registry), then runs
one etcd, two upstream and three node containers with host networking on
loopback addresses of their own, registers the upstreams with etcdctl, and
shows: clients served through every node, `pmlb status` seeing the cluster, and
a node container stopped with `docker stop` draining cleanly (exit status 0,
gone from etcd at once). Every container is removed at the end, by name.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import etcdctl
from tests.containers import engine_error
from tests.support import ROOT, free_port, http_get, needs, run_pmlb, tcp_open, wait_until

IMAGE = "pmlb:0.1.0"
ETCD_IMAGE = "pmlb-etcd:3.5.1"
PREFIX = "/pmlb-deploy"

_NO_ENGINE = engine_error()  # asked once: it runs `docker info`
# Building the images comes first (the fixture below): on a fresh machine that
# includes debootstrapping a Debian base, minutes beyond the suite's 120 s.
pytestmark = [needs(_NO_ENGINE), pytest.mark.timeout(1500)]


def docker(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr.strip()}"
    return r.stdout.strip()


@pytest.fixture(scope="module")
def images() -> None:
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # OCI labels on the image; no build stage left behind.
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", IMAGE))
    assert labels["org.opencontainers.image.version"] == IMAGE.split(":")[1]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "pmlb.stage" not in labels
    left = docker("images", "-q", "--filter", "label=pmlb.stage=build")
    assert left == "", f"build stage images left behind: {left}"


@pytest.fixture
def containers() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


def run(names: list[str], name: str, image: str, *args: str) -> None:
    names.append(name)
    docker("run", "-d", "--name", name, "--network", "host", image, *args)


def answer(host: str, port: int, text: bytes) -> str:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(text + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(200)
            assert chunk, "closed before answering"
            data += chunk
    return data.decode()


def test_the_image_runs_a_cluster(images: None, containers: list[str]) -> None:
    tag = f"pmlbt{int(time.time()) % 100000}"
    etcd_port, peer = free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    run(
        containers,
        f"{tag}-etcd",
        ETCD_IMAGE,
        "--data-dir=/tmp/etcd",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=default=http://127.0.0.1:{peer}",
    )
    wait_until(lambda: tcp_open("127.0.0.1", etcd_port), 30, "etcd container")

    ups = {}
    for i, uid in enumerate(("u1", "u2")):
        host, port = f"127.0.0.{21 + i}", free_port()
        ups[uid] = f"{host}:{port}"
        run(containers, f"{tag}-{uid}", IMAGE, "echo-upstream", "--id", uid, "--listen", ups[uid])
    for uid, addr in ups.items():
        host, port = addr.split(":")
        wait_until(lambda h=host, p=int(port): tcp_open(h, p), 30, f"upstream {uid}")
        etcdctl(etcd_url, "put", f"{PREFIX}/services/echo/upstreams/{uid}", addr)

    nodes = {}
    for i in (1, 2, 3):
        host = f"127.0.0.{30 + i}"
        listen, admin = free_port(), free_port()
        nodes[f"n{i}"] = (host, listen)
        run(
            containers,
            f"{tag}-n{i}",
            IMAGE,
            "node",
            "--workers=1",
            f"--node-id=n{i}",
            "--service=echo",
            "--framing=line",
            f"--etcd={etcd_url}",
            f"--etcd-prefix={PREFIX}",
            f"--listen={host}:{listen}",
            f"--admin={host}:{admin}",
            "--drain-timeout=2",
            "--drain-window=1",
        )
    for node, (host, listen) in nodes.items():
        wait_until(lambda h=host, p=listen: tcp_open(h, p), 30, f"{node} listening")

    # Clients through every node, answered by the upstreams.
    for node, (host, listen) in nodes.items():
        reply = wait_until(
            lambda h=host, p=listen: answer(h, p, b"hello"), 30, f"a reply through {node}"
        )
        mark, upstream, text = str(reply).strip().split(" ", 2)
        assert mark.startswith(f"{node}."), reply
        assert upstream in ups
        assert text == "hello"

    status = run_pmlb("status", "--json", "--etcd", etcd_url, "--etcd-prefix", PREFIX)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert {n["id"] for n in report["nodes"]} == set(nodes)
    assert all(n["reachable"] for n in report["nodes"])
    assert {u["id"] for u in report["services"]["echo"]["upstreams"]} == set(ups)

    # docker stop: SIGTERM, the node drains and exits 0, and leaves etcd at once.
    t0 = time.monotonic()
    stopper = subprocess.Popen(["docker", "stop", "-t", "30", f"{tag}-n1"])
    wait_until(
        lambda: not etcdctl(etcd_url, "get", f"{PREFIX}/nodes/n1", "--print-value-only"),
        5,
        "n1 gone from etcd",
    )
    left = time.monotonic() - t0
    assert stopper.wait(60) == 0
    state = json.loads(docker("inspect", f"{tag}-n1"))[0]["State"]
    assert state["ExitCode"] == 0, docker("logs", f"{tag}-n1")
    assert left < 3, f"left etcd after {left:.1f}s"
    logs = subprocess.run(
        ["docker", "logs", f"{tag}-n1"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "node n1 stopped" in logs.stdout + logs.stderr


def _containers_block() -> list[str]:
    """README's Containers block, one command a line (continuations joined,
    comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- readme-containers -->", 1)[1].split("<!-- /readme-containers -->")[0]
    body = block.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.split("  #", 1)[0].strip() for line in body.splitlines() if line.strip()]


def test_readmes_containers_block_runs_as_written(images: None, containers: list[str]) -> None:
    """README's Containers section as a reader types it (issue [17]): from
    `make image` to `docker stop` and `docker rm`, line by line, waiting for
    each container to listen and the node's link before connecting, as a
    person would. `pmlb connect` gets the line typed into it answered by u1
    through n1, and the stopped node exits 0."""
    busy = [p for p in (("127.0.0.1", 2379), ("127.0.0.21", 7001), ("127.0.0.31", 9000))
            if tcp_open(*p)]  # fmt: skip
    assert not busy, f"README's addresses are taken here: {busy}"
    containers.extend(["etcd", "u1", "n1"])  # removed whatever happens
    listens = {"etcd": ("127.0.0.1", 2379), "u1": ("127.0.0.21", 7001), "n1": ("127.0.0.31", 9000)}
    for line in _containers_block():

        def sh(line: str = line, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(["bash", "-c", line], cwd=ROOT, input=stdin, text=True,
                                  capture_output=True, timeout=900, check=False)  # fmt: skip

        if " connect " in line:
            # The node takes u1 from etcd's watch: typed once the link is up.
            wait_until(lambda: _link_up("127.0.0.31", 9100), 30, "n1's link to u1")
            r = sh(stdin="hello\n")
            assert r.returncode == 0, (line, r.stdout, r.stderr)
            mark, upstream, text = r.stdout.split()
            assert (mark.startswith("n1."), upstream, text) == (True, "u1", "hello"), r.stdout
            continue
        r = sh()
        assert r.returncode == 0, (line, r.stdout, r.stderr)
        if line.startswith("docker run"):
            name = line.split("--name ", 1)[1].split()[0]
            wait_until(lambda n=name: tcp_open(*listens[n]), 30, f"{name} listening")
        if line.startswith("docker stop"):
            state = json.loads(docker("inspect", "n1"))[0]["State"]
            assert state["ExitCode"] == 0, docker("logs", "n1")
    left = docker("ps", "-a", "--filter", "name=^(etcd|u1|n1)$", "--format", "{{.Names}}")
    assert left == "", f"README's last line left containers: {left}"


def _link_up(host: str, admin: int) -> bool:
    try:
        status, body = http_get(f"http://{host}:{admin}/metrics")
    except OSError:
        return False
    return status == 200 and any(
        line.startswith("pmlb_upstream_up{") and 'upstream="u1"' in line and line.endswith(" 1.0")
        for line in body.splitlines()
    )
