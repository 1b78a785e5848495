"""Test support: free ports, pmlb processes, polling with deadlines, framing.

Everything here drives real processes and sockets; the only "waiting" is
polling a condition against a deadline, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Set by .ci/run: a test whose tool is missing fails instead of skipping, so a
# CI machine that lacks docker, chromium or HAProxy cannot turn green by
# leaving their tests out.
STRICT: bool = bool(os.environ.get("PMLB_TEST_STRICT"))


def needs(missing: str | None) -> pytest.MarkDecorator:
    """Mark a test (or a module, as ``pytestmark``) as needing a tool;
    ``missing`` says why it is unavailable and how to install it, or is None
    when it is there. See ``pytest_runtest_setup`` in tests/conftest.py."""
    return pytest.mark.needs(missing)


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound now: free to listen on, which a port nobody
    listens on may not be (it can be the source port of some connection)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> object:
    """Poll ``cond`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # the condition may race with start-up
            last_exc = exc
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


async def async_wait_until(
    cond: Callable[[], Awaitable[object] | object], timeout: float, what: str, step: float = 0.02
) -> object:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def children(pid: int) -> list[int]:
    """PIDs of the live child processes of ``pid``."""
    out = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(status.parent.name))
    return out


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


class Proc:
    """A pmlb child process (or ``python -m module``) with its log in a file;
    stopped by PID."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        module: str = "pmlb",
        program: str | None = None,
    ):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, **(env or {})}
        # nofile: run the process with that file-descriptor limit (soft and hard).
        limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
        self.proc = subprocess.Popen(
            # program: run that executable instead of ``python -m module``.
            [*limit, *([program] if program else [sys.executable, "-m", module]), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def tree_rss_bytes(self) -> int:
        """Resident bytes of the process and its children (a node of several
        workers is its supervisor and the workers)."""
        total = 0
        for pid in (self.pid, *children(self.pid)):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ask_line(port: int, line: bytes) -> bytes:
    """Send ``line`` to a node (line framing) on a new connection; its reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"closed after {out!r}"
            out += chunk
        return out


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(admin_port: int) -> dict[str, float]:
    """Metrics as {'name{labels}': value}."""
    _, text = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


# -- framing, written independently of pmlb's codecs ----------------------------


def encode(framing: str, msg: bytes) -> bytes:
    if framing == "line":
        return msg + b"\n"
    if framing == "len16":
        return struct.pack(">H", len(msg)) + msg
    if framing == "len32":
        return struct.pack(">I", len(msg)) + msg
    return msg


async def read_message(reader: asyncio.StreamReader, framing: str) -> bytes:
    if framing == "line":
        return (await reader.readuntil(b"\n"))[:-1]
    if framing == "len16":
        (n,) = struct.unpack(">H", await reader.readexactly(2))
        return await reader.readexactly(n)
    if framing == "len32":
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        return await reader.readexactly(n)
    raise ValueError(framing)


def chunks(data: bytes, sizes: Iterator[int]) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        n = next(sizes)
        yield data[i : i + n]
        i += n


def run_pmlb(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``pmlb ARGS`` as a user runs it (this checkout's code), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pmlb", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def node_status(admin: int) -> dict[str, object]:
    """The ``node`` part of a node's /api/status."""
    import json

    code, body = http_get(f"http://127.0.0.1:{admin}/api/status")
    assert code == 200, body
    node = json.loads(body)["node"]
    assert isinstance(node, dict)
    return node


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True
