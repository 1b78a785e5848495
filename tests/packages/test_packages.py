"""The packages as a user installs them (``make test-packages``): nothing of
this repository on the path, only what the package carries.

* Python: ``python -m build`` makes a wheel and an sdist. The wheel goes into
  two empty venvs: the base install must give a working SDK (an upstream
  written in an empty project) and say plainly that ``pmlb node`` needs the
  ``[node]`` extra; ``[node]`` must give a working node. The node from one
  venv serves a client through the upstream from the other. The sdist builds
  a wheel of the same files.
* Node.js: ``npm pack`` makes the tarball an npm user installs (and a clone's
  folder installs with ``--install-links``); an empty project installs it
  with its dependencies from the registry, runs an upstream
  written against it behind a node, and type-checks a TypeScript file against
  its declarations with the SDK's locked TypeScript.

README's blocks run as written (issue [17]): the wheel block (in a copy of the
checkout, HOME a temporary directory) gives the venv whose node serves here,
and the folder install is README's `npm install` line, running README's
Node.js example.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import JS_SDK, Cluster
from tests.support import ROOT, Proc, ask_line, free_port, tcp_open, wait_until

# pip and npm fetch the dependencies from their registries: minutes at most.
INSTALL_TIMEOUT = 600


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH into this checkout,
    no virtualenv of ours, no pmlb settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PMLB_")
    }


def _run(cmd: list[str], cwd: Path, timeout: float = INSTALL_TIMEOUT) -> str:
    r = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def readme_block(name: str) -> list[str]:
    """README's command block ``name`` (between its markers), one command a
    line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- readme-{name} -->", 1)[1].split(f"<!-- /readme-{name} -->", 1)[0]
    body = block.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].rstrip() for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def readme_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """README's wheel block, run as written in a copy of this checkout (its
    tracked files: a fresh clone) with HOME in a temporary directory, so its
    `~/pmlb-env` and `dist/` are the test's own. Returns the dist folder and
    the venv's bin, which holds the SDK and the node."""
    clone = tmp_path_factory.mktemp("clone")
    home = tmp_path_factory.mktemp("home")
    tracked = (
        subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = {**_clean_env(), "HOME": str(home)}
    for line in readme_block("wheel"):
        r = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=INSTALL_TIMEOUT, check=False)  # fmt: skip
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.strip() == f"pmlb {_version()}", r.stdout
    return clone / "dist", home / "pmlb-env" / "bin"


def _version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@pytest.fixture(scope="module")
def dist(readme_wheel: tuple[Path, Path]) -> Path:
    return readme_wheel[0]


def _venv(where: Path, requirement: str) -> Path:
    _run([sys.executable, "-m", "venv", str(where)], where.parent)
    _run([str(where / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
          requirement], where.parent)  # fmt: skip
    return where / "bin"


PY_UPSTREAM = """
import asyncio, sys
from pmlb.upstream import Conn, Handler, UpstreamServer

class Echo(Handler):
    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(b"from the wheel " + data)

async def main() -> None:
    server = UpstreamServer(Echo(), upstream_id="wheel", listen=sys.argv[1])
    await server.start()
    print("serving", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_the_wheel_installs_an_sdk_and_with_node_a_node(
    dist: Path, readme_wheel: tuple[Path, Path], tmp_path: Path, cluster: Cluster
) -> None:
    (wheel,) = dist.glob("pmlb_lb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pmlb", f"pmlb_lb-{_version()}.dist-info"}
    for data in (
        "pmlb/py.typed",
        "pmlb/observability/dashboard.html",
        "pmlb/observability/pmlb.js",
        "pmlb/transport/_nghttp2.pyi",
    ):
        assert data in names, data
    # The native link transport is in the wheel (CI has its compiler and headers).
    assert [n for n in names if n.startswith("pmlb/transport/_nghttp2.") and n.endswith(".so")]

    project = tmp_path / "project"
    project.mkdir()
    (project / "upstream.py").write_text(PY_UPSTREAM)
    base = _venv(tmp_path / "base", str(wheel))
    port = free_port()
    up = Proc("wheel-upstream", [str(project / "upstream.py"), f"127.0.0.1:{port}"],
              cluster.log_dir, program=str(base / "python"))  # fmt: skip
    cluster.procs.append(up)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not up.alive(), 30, "the wheel's upstream")
    assert up.alive(), up.log()
    # The base install is the SDK: the node says what it needs.
    r = subprocess.run(
        [str(base / "pmlb"), "node", "--listen", "127.0.0.1:0", "--upstream", "u=127.0.0.1:1"],
        env=_clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pip install 'pmlb-lb[node]'" in r.stderr, r.stderr

    full = readme_wheel[1]  # README's venv: the wheel with [node]
    listen, admin = free_port(), free_port()
    node = Proc(
        "wheel-node",
        ["node", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
         "--upstream", f"wheel=127.0.0.1:{port}", "--framing", "line"],
        cluster.log_dir,
        program=str(full / "pmlb"),
    )  # fmt: skip
    cluster.procs.append(node)
    wait_until(lambda: tcp_open("127.0.0.1", listen) or not node.alive(), 30, "the wheel's node")
    assert node.alive(), node.log()
    wait_until(lambda: b"from the wheel" in ask_line(listen, b"hi\n"), 20, "a reply via the link")
    assert ask_line(listen, b"hello\n") == b"from the wheel hello\n"
    wait_until(lambda: "links on nghttp2 (native" in node.log(), 10, "native links said")


def test_the_sdist_builds_the_same_wheel(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("pmlb_lb-*.tar.gz")
    (wheel,) = dist.glob("pmlb_lb-*.whl")
    out = tmp_path / "from-sdist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(sdist)],
         tmp_path)  # fmt: skip
    (rebuilt,) = out.glob("pmlb_lb-*.whl")
    assert sorted(zipfile.ZipFile(rebuilt).namelist()) == sorted(zipfile.ZipFile(wheel).namelist())


JS_UPSTREAM = """
import { UpstreamServer } from '@pmlb/upstream';

const server = new UpstreamServer(
  { onMessage(conn, data) { conn.send(Buffer.concat([Buffer.from('from npm '), data])); } },
  { upstreamId: 'npm', listen: process.argv[2] },
);
await server.start();
console.log('serving');
"""


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory, node_bin: str) -> Path:
    # node_bin: the SDK's own packages (npm ci from its lock), for tsc.
    out = tmp_path_factory.mktemp("npm")
    _run(["npm", "pack", "--pack-destination", str(out)], JS_SDK)
    (tgz,) = out.glob("pmlb-upstream-*.tgz")
    return tgz


@pytest.mark.parametrize("source", ["tarball", "folder"])
def test_the_npm_package_installs_into_an_empty_project(
    source: str, request: pytest.FixtureRequest, tmp_path: Path, cluster: Cluster, node_bin: str
) -> None:
    """From the packed tarball, and from a clone's folder as README shows it
    (--install-links: npm copies the folder and installs its dependencies,
    instead of a symlink into a folder that has none)."""
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text(
        json.dumps({"name": "app", "version": "1.0.0", "private": True, "type": "module"})
    )
    if source == "tarball":
        _run(["npm", "install", "--no-audit", "--no-fund", str(request.getfixturevalue("tarball"))],
             project)  # fmt: skip
    else:
        # README's line as written, the clone being this checkout.
        (line,) = readme_block("npm")
        assert line.startswith("npm install "), line
        assert "/path/to/pmlb/" in line, line
        _run(["bash", "-c", line.replace("/path/to/pmlb/", f"{ROOT}/")], project)
    installed = project / "node_modules" / "@pmlb" / "upstream"
    assert (installed / "proto" / "pmlb" / "v1" / "upstream.proto").exists()
    assert (installed / "types" / "index.d.ts").exists()
    if source == "tarball":
        (project / "upstream.mjs").write_text(JS_UPSTREAM)
        port = free_port()
        up = Proc("npm-upstream", [str(project / "upstream.mjs"), f"127.0.0.1:{port}"],
                  cluster.log_dir, program=node_bin)  # fmt: skip
    else:
        # README's Node.js example, as a module of the project (it listens on 7003).
        example = ROOT.joinpath("README.md").read_text().split("```js\n", 1)[1].split("```", 1)[0]
        (project / "upstream.mjs").write_text(example)
        port = 7003
        up = Proc("npm-upstream", [str(project / "upstream.mjs")], cluster.log_dir,
                  program=node_bin)  # fmt: skip
    cluster.procs.append(up)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not up.alive(), 30, "the npm upstream")
    assert up.alive(), up.log()
    node = cluster.node([f"npm=127.0.0.1:{port}"], wait_links=["npm"])
    if source == "tarball":
        assert ask_line(node.port, b"hello\n") == b"from npm hello\n"
    else:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s, \
                s.makefile("rb") as f:  # fmt: skip
            welcome = f.readline()
            assert welcome.startswith(b"welcome n1."), welcome
            s.sendall(b"hello\n")
            assert f.readline() == b"HELLO\n"
        mark = welcome.split()[1].decode()
        wait_until(lambda: f"{mark} closed: client_closed" in up.log(), 10, "onClose")

    # TypeScript users: the declarations resolve from the installed package.
    (project / "check.ts").write_text(
        "import { UpstreamServer, type Conn } from '@pmlb/upstream';\n"
        "const s = new UpstreamServer({ onMessage(c: Conn, d: Buffer) { c.send(d); } },"
        " { upstreamId: 'ts' });\n"
        "const p: Promise<number> = s.start();\n"
        "void p;\n"
    )
    tsc = JS_SDK / "node_modules" / ".bin" / "tsc"
    types = JS_SDK / "node_modules" / "@types"
    _run([str(tsc), "--noEmit", "--strict", "--module", "NodeNext", "--moduleResolution",
          "NodeNext", "--target", "ES2022", "--typeRoots", str(types), "--types", "node",
          "check.ts"], project)  # fmt: skip
