"""Fixtures shared by the integration and end-to-end suites."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from pmlb.testing.localetcd import LocalEtcd, etcd_binary
from pmlb.transport import DEFAULT_TRANSPORT, TRANSPORTS
from tests.support import ROOT, STRICT, Proc, free_port, run_pmlb, scrape, tcp_open, wait_until

# tests/deploy builds container images and runs containers: `make test-deploy`.
collect_ignore = [] if os.environ.get("PMLB_TEST_DEPLOY") else ["deploy"]
# tests/partitions needs root and network namespaces: `make test-partitions`.
if not os.environ.get("PMLB_TEST_PARTITIONS"):
    collect_ignore.append("partitions")
# tests/handover puts 5,200 clients through three live handovers: `make test-handover`.
if not os.environ.get("PMLB_TEST_HANDOVER"):
    collect_ignore.append("handover")
# tests/packages builds the wheel and the npm tarball and installs them from
# the registries into empty projects: `make test-packages`.
if not os.environ.get("PMLB_TEST_PACKAGES"):
    collect_ignore.append("packages")
# Ten crashing-message runs at the default worker count: `make test-matrix`
# (make test runs the single-run poison test at the default).
if os.environ.get("PMLB_TEST_MATRIX") != "full":
    collect_ignore.append("faults/test_poison_workers.py")

# Hypothesis checks properties, not speed: its default 200 ms deadline per
# example is a timed assertion that fails on a busy shared machine (it did,
# once, in test_values). Performance is `make bench`'s job.
settings.register_profile("pmlb", deadline=None)
settings.load_profile("pmlb")

# A node a test starts is one process unless the test runs under the
# ``workers`` parameter below (or asks for workers itself, test_workers.py).
os.environ["PMLB_WORKERS"] = "1"
# The modules whose guarantees must hold in the configuration users get: each
# test runs at --workers 1 and at the default (one worker per CPU, two here),
# through PMLB_WORKERS (0 = the default).
WORKER_MODULES = frozenset(
    {
        "test_failover",
        "test_hostile",
        "test_upstream_faults",
        "test_persistent",
        "test_etcd_cluster",
        "test_etcd_members",
        "test_limits",
        "test_dns_cluster",
        "test_dataplane",
        "test_dashboard_browser",
        "test_modbus",
        "test_resp_plugin",
        "test_handover",
    }
)
WORKERS = ("w1", "wdefault")
# The etcd timings of the suite's cluster nodes (Cluster.node): tests derive
# their time bounds from these, not from literals.
LEASE_TTL = 3
CHECK_INTERVAL = 0.3
# Modules in both sets would run 3 x 2 times; `make test` runs the pairs that
# cover each value of each axis, with the defaults together (nghttp2 links at
# the default worker count, the others at one worker), and the modules only in
# WORKER_MODULES at the default; `make test-matrix` (PMLB_TEST_MATRIX=full)
# runs every combination but grpclib (the fallback) at the default count.
FULL_MATRIX = os.environ.get("PMLB_TEST_MATRIX") == "full"

# Modules whose tests drive the node <-> upstream links: each of their tests runs
# once per Bridge transport (pmlb.transport), node and upstreams alike, through
# PMLB_LINK_TRANSPORT, which `pmlb node`, `pmlb echo-upstream` and the SDK read.
LINK_MODULES = frozenset(
    {
        "test_dataplane",
        "test_failover",
        "test_hostile",
        "test_sdk",
        "test_bad_upstream",
        "test_security",
        "test_tls",
        "test_persistent",
        "test_fuzz_upstream",
        "test_upstream_faults",
        "test_nodejs_sdk",
    }
)


# `make test` runs link tests on the default (nghttp2: native node links,
# grpclib upstreams) and on grpc.aio; the node's pure-Python links (grpclib, what
# nghttp2 falls back to when it is not built) on the FALLBACK_MODULES; the
# matrix runs its modules (failover and hostile among them) on all three.
SUITE_TRANSPORTS = TRANSPORTS if FULL_MATRIX else ("nghttp2", "grpcio")
FALLBACK_MODULES = frozenset({"test_dataplane", "test_tls"})

# For a test outside LINK_MODULES whose guarantee crosses the links (etcd
# operations that move marks, metadata, traces, link metrics, load): once per
# Bridge transport.
both_transports = pytest.mark.parametrize("link_transport", SUITE_TRANSPORTS, indirect=True)

# For a test of a module outside WORKER_MODULES that must hold at the default
# worker count too: the default in `make test`, both in the matrix.
default_workers_too = pytest.mark.parametrize(
    "workers", WORKERS if FULL_MATRIX else WORKERS[1:], indirect=True
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``needs(why)``: skip here, fail under .ci/run (tests/support.needs)."""
    for mark in item.iter_markers("needs"):
        why = mark.args[0] if mark.args else None
        if why:
            if STRICT:
                pytest.fail(f"{why} (PMLB_TEST_STRICT: CI does not skip)", pytrace=False)
            pytest.skip(why)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    links, workers = module in LINK_MODULES, module in WORKER_MODULES
    transports = SUITE_TRANSPORTS
    if module in FALLBACK_MODULES and "grpclib" not in transports:
        transports = (*transports, "grpclib")
    if links and workers:
        pairs = (
            # Every pair, except the pure-Python fallback at one worker only:
            # which gRPC code a worker's links run is independent of how many
            # workers there are, and the matrix must fit CI's time.
            [(t, w) for t in TRANSPORTS for w in WORKERS if t != "grpclib" or w == WORKERS[0]]
            if FULL_MATRIX
            # The default transport at the default worker count, the others at one.
            else [(t, WORKERS[1] if t == DEFAULT_TRANSPORT else WORKERS[0]) for t in transports]
        )
        metafunc.parametrize(("link_transport", "workers"), pairs, indirect=True)
    elif links:
        metafunc.parametrize("link_transport", transports, indirect=True)
    elif workers:
        # `make test` runs these at the default only (every other module covers
        # one worker); the matrix adds --workers 1.
        metafunc.parametrize("workers", WORKERS if FULL_MATRIX else WORKERS[1:], indirect=True)


@pytest.fixture(autouse=True)
def link_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The Bridge transport under test (link modules), else the environment's."""
    transport: str | None = getattr(request, "param", None)
    if transport is not None:
        monkeypatch.setenv("PMLB_LINK_TRANSPORT", transport)
    return transport


@pytest.fixture(autouse=True)
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The worker count under test (worker modules): "w1" or "wdefault"."""
    param: str | None = getattr(request, "param", None)
    if param is not None:
        monkeypatch.setenv("PMLB_WORKERS", "1" if param == "w1" else "0")
    return param


@dataclass
class Upstream:
    proc: Proc
    id: str
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Node:
    proc: Proc
    port: int
    admin: int

    def metrics(self) -> dict[str, float]:
        return scrape(self.admin)


class Cluster:
    """Starts real pmlb processes for one test and stops them all by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def echo(self, uid: str, *, plain: bool = False, port: int | None = None) -> Upstream:
        port = port or free_port()
        args = ["echo-upstream", "--listen", f"127.0.0.1:{port}", "--id", uid]
        if plain:
            args.append("--plain")
        proc = Proc(f"echo-{uid}-{len(self.procs)}", args, self.log_dir)
        self.procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, f"echo {uid}")
        assert proc.alive(), proc.log()
        return Upstream(proc, uid, port)

    def journaling(self, uid: str, port: int | None = None) -> Upstream:
        """An SDK upstream that answers like echo and journals every message it
        handles (tests/faults/journal_upstream.py); see ``journals``."""
        port = port or free_port()
        journal = self.log_dir / f"journal-{uid}.txt"
        args = ["--listen", f"127.0.0.1:{port}", "--id", uid, "--journal", str(journal)]
        proc = Proc(
            f"journal-{uid}-{len(self.procs)}",
            args,
            self.log_dir,
            module="tests.faults.journal_upstream",
        )
        self.procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, f"upstream {uid}")
        assert proc.alive(), proc.log()
        return Upstream(proc, uid, port)

    def script(self, uid: str, script: Path, *, program: str | None = None) -> Upstream:
        """An example upstream (``script --listen HOST:PORT --id UID``), run by
        ``program`` (default: this Python), once it listens."""
        port = free_port()
        args = [str(script), "--listen", f"127.0.0.1:{port}", "--id", uid]
        proc = Proc(
            f"{script.stem}-{uid}-{len(self.procs)}",
            args,
            self.log_dir,
            program=program or sys.executable,
        )
        self.procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, f"upstream {uid}")
        assert proc.alive(), proc.log()
        return Upstream(proc, uid, port)

    def journals(self) -> list[Path]:
        return sorted(self.log_dir.glob("journal-*.txt"))

    def node(
        self,
        upstreams: list[str],
        *,
        framing: str = "line",
        node_id: str = "n1",
        extra: list[str] | None = None,
        wait_links: list[str] | None = None,
        etcd: str | None = None,
        prefix: str = "/pmlb",
        service: str = "echo",
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        port: int | None = None,
        nofile: int | None = None,
        rise_fall: tuple[int, int] | None = (1, 1),
    ) -> Node:
        """A node; with ``etcd``, a quick checker (``rise_fall`` None: the
        default --check-rise/--check-fall)."""
        port, admin = port or free_port(host), free_port()
        args = [
            "node",
            "--node-id",
            node_id,
            "--listen",
            f"{host}:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--framing",
            framing,
            "--service",
            service,
            # tests stop nodes with clients still connected: keep draining short
            "--drain-timeout",
            "1",
            "--drain-window",
            "0.2",
        ]
        if etcd:
            args += [
                "--etcd",
                etcd,
                "--etcd-prefix",
                prefix,
                "--lease-ttl",
                str(LEASE_TTL),
                "--check-interval",
                str(CHECK_INTERVAL),
                "--check-timeout",
                "0.3",
            ]
            if rise_fall is not None:
                args += ["--check-rise", str(rise_fall[0]), "--check-fall", str(rise_fall[1])]
        for u in upstreams:
            args += ["--upstream", u]
        proc = Proc(
            f"node-{node_id}-{len(self.procs)}", args + (extra or []), self.log_dir, env, nofile
        )
        self.procs.append(proc)
        wait_until(lambda: tcp_open(host, port) or not proc.alive(), 15, "node listener")
        assert proc.alive(), proc.log()
        node = Node(proc, port, admin)
        ids = wait_links if wait_links is not None else [u.partition("=")[0] for u in upstreams]
        for uid in ids:
            wait_until(
                lambda uid=uid: node.metrics().get(f'pmlb_upstream_up{{upstream="{uid}"}}') == 1,
                15,
                f"link to {uid} up",
            )
        return node

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


class Etcd:
    """A real etcd for one test, with a key prefix of the test's own."""

    def __init__(self, server: LocalEtcd, prefix: str) -> None:
        self.server = server
        self.url = server.url
        self.prefix = prefix

    def ctl(self, *args: str) -> str:
        return etcdctl(self.url, *args)

    def put(self, key: str, value: str) -> None:
        self.ctl("put", self.prefix + key, value)

    def delete(self, key: str) -> None:
        self.ctl("del", self.prefix + key)

    def get(self, key: str) -> str | None:
        out = self.ctl("get", self.prefix + key, "--print-value-only")
        return out.rstrip("\n") if out else None

    def pmlb(self, *args: str) -> str:
        """Run ``pmlb ARGS --etcd URL --etcd-prefix P``; its stdout (fails the test on error)."""
        r = run_pmlb(*args, "--etcd", self.url, "--etcd-prefix", self.prefix)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def keys(self, under: str) -> list[str]:
        out = self.ctl("get", "--prefix", "--keys-only", self.prefix + under)
        return [k for k in out.splitlines() if k]


def etcdctl(endpoints: str, *args: str) -> str:
    """``etcdctl --endpoints ENDPOINTS ARGS``; its stdout (fails the test on error)."""
    r = subprocess.run(
        [etcdctl_binary(), "--endpoints", endpoints, "--command-timeout", "5s", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def etcdctl_binary() -> str:
    return str(Path(etcd_binary()).with_name("etcdctl"))


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A real etcd: a process by default; with PMLB_TEST_ETCD=container, a
    container (tests/containers.py), skipped only where no engine can run."""
    server: Any
    if os.environ.get("PMLB_TEST_ETCD") == "container":
        from tests.containers import ContainerEtcd, engine_error

        why = engine_error()
        if why is not None:
            if STRICT:
                pytest.fail(f"PMLB_TEST_ETCD=container: {why} (PMLB_TEST_STRICT: CI does not skip)")
            pytest.skip(f"PMLB_TEST_ETCD=container: {why}")
        server = ContainerEtcd(log_path=tmp_path / "etcd.log")
    else:
        server = LocalEtcd(log_path=tmp_path / "etcd.log")
    server.start()
    try:
        yield Etcd(server, f"/pmlb-{tmp_path.name}")
    finally:
        server.stop()


# The Node.js SDK (its tests: tests/unit/test_nodejs_sdk_units.py and
# tests/integration/test_nodejs_sdk.py).
JS_SDK = ROOT / "node" / "upstream-js"


@pytest.fixture(scope="session")
def node_bin() -> str:
    """Node.js, with the Node.js SDK's packages installed from its lock file
    (``npm ci``, only when node_modules is missing or older than the lock)."""
    node = shutil.which("node")
    assert node, "Node.js (node) is needed: .ci/run installs it"
    stamp = JS_SDK / "node_modules" / ".package-lock.json"
    lock = JS_SDK / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_SDK, check=True, timeout=300
        )
    return node


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def pytest_terminal_summary(terminalreporter: object) -> None:
    """Print the fault suite's figures (tests/faults/report.py) after the run."""
    from tests.faults.report import table

    text = table()
    if text:
        terminalreporter.write_sep("=", "fault and partition suite figures")  # type: ignore[attr-defined]
        terminalreporter.write_line(text)  # type: ignore[attr-defined]
    # make test-partitions splices this file into README (scripts/splice_table.py).
    out = os.environ.get("PMLB_FIGURES_OUT")
    if out:
        Path(out).write_text(text + "\n" if text else "")
