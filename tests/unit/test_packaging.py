"""Packaging: a free distribution name, compatible ranges, exact versions in
constraints.txt, and an SDK that runs without the node's dependencies."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.support import ROOT

NODE_ONLY = ("etcd3aio", "prometheus_client", "uvloop", "opentelemetry.sdk")

# Runs in a fresh interpreter whose imports of the node's dependencies fail,
# as on a machine where only the SDK's dependencies are installed.
SDK_ONLY = f"""
import asyncio, sys
BLOCKED = {NODE_ONLY!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
from pmlb.upstream import Conn, Handler, UpstreamServer
from pmlb.upstream.echo import run_echo

class Echo(Handler):
    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(data)

async def main() -> None:
    server = UpstreamServer(Echo(), upstream_id="sdk-only")
    port = await server.start()
    await server.stop(0)
    stop = asyncio.Event()
    stop.set()
    await run_echo("127.0.0.1:0", "e", False, 65536, stop)
    print("SDK OK", port > 0)

asyncio.run(main())
from pmlb.commands.cli import main as cli
sys.exit(cli(["node", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2"]))
"""


def test_the_sdk_runs_without_the_node_dependencies() -> None:
    r = subprocess.run(
        [sys.executable, "-c", SDK_ONLY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert "SDK OK True" in r.stdout, r.stderr
    # The node itself says what to install, with exit status 2.
    assert r.returncode == 2, r.stderr
    assert "pip install 'pmlb-lb[node]'" in r.stderr


def test_ranges_in_pyproject_exact_versions_in_constraints() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "pmlb-lb"
    assert project["scripts"]["pmlb"] == "pmlb.commands.cli:main"
    runtime = project["dependencies"] + project["optional-dependencies"]["node"]
    assert not [d for d in runtime if "==" in d], "ranges, not pins, for importers"
    base = " ".join(project["dependencies"]).replace("-", "_")
    assert not [m for m in NODE_ONLY if m.split(".")[0].replace("-", "_") in base]
    pins = {
        re.split(r"==", line)[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for dep in runtime:
        name = re.split(r"[<>=;\[ ]", dep)[0].lower().replace("_", "-")
        assert name in pins, f"{name} has no exact version in constraints.txt"


def test_the_wheel_ships_the_dashboard_page(tmp_path: Path) -> None:
    """The admin endpoint serves the page from the installed package."""
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    r = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("pmlb_lb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pmlb/observability/dashboard.html" in names
    assert "pmlb/py.typed" in names
