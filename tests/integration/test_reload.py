"""SIGHUP reloads, never kills: what can change live is applied, the rest is
refused by name, a bad file is refused whole; `pmlb node --check` lists every
problem. (Before: SIGHUP killed a node or an echo upstream, exit 129.)"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.support import async_wait_until, run_pmlb


@pytest.mark.asyncio(loop_scope="function")
async def test_sighup_applies_what_it_can_and_refuses_the_rest(
    cluster: Cluster, tmp_path: Path
) -> None:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    conf = tmp_path / "node.toml"
    conf.write_text(f'upstream = ["u1={u1.addr}"]\n')
    node = await asyncio.to_thread(
        cluster.node, [], wait_links=["u1"], extra=["--config", str(conf)]
    )
    async with asyncio.timeout(30):
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"hi\n")
        assert (await r.readuntil(b"\n")).endswith(b" u1 hi\n")

        conf.write_text(
            f'upstream = ["u1={u1.addr} weight=3", "u2={u2.addr}"]\n'
            'idle-timeout = "1s"\nwindow = "1MiB"\n'
        )
        node.proc.signal(signal.SIGHUP)
        await async_wait_until(
            lambda: node.metrics().get('pmlb_upstream_up{upstream="u2"}') == 1, 10, "u2 added"
        )
        assert await r.read() == b"", "the idle client is closed under the new idle timeout"
        m = await asyncio.to_thread(node.metrics)
        assert m['pmlb_connections_closed_total{reason="idle_timeout"}'] == 1, "the one idle client"
        log = node.proc.log()
        assert "--window changed but cannot change live" in log
        assert "reload 1 applied: idle_timeout, upstreams" in log
        assert "upstream u1 changed: weight 1 -> 3" in log, "a static weight, live"

        conf.write_text("idle-timeout = [this is not TOML\n")
        node.proc.signal(signal.SIGHUP)
        await async_wait_until(lambda: "reload refused" in node.proc.log(), 10, "refused")
        r2, w2 = await asyncio.open_connection("127.0.0.1", node.port)
        w2.write(b"still\n")
        assert (await r2.readuntil(b"\n")).endswith(b" still\n"), "serving as before"
        w2.close()
    assert node.proc.alive()

    u1.proc.signal(signal.SIGHUP)
    await async_wait_until(lambda: "SIGHUP received" in u1.proc.log(), 10, "echo got HUP")
    assert u1.proc.alive(), "an echo upstream survives SIGHUP"


def test_check_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('window = "1 parsec"\nbogus = 1\n')
    args = ["node", "--check", "--listen", "127.0.0.1:9000"]
    r = run_pmlb(*args, "--upstream", "127.0.0.1:1", "--config", str(conf), "--ack-timeout", "x")
    assert r.returncode == 2
    problems = r.stderr.strip().splitlines()
    assert len(problems) == 3, problems
    assert any("bogus" in p for p in problems)
    assert any("window" in p for p in problems)
    assert any("--ack-timeout" in p for p in problems)
    ok = run_pmlb(*args, "--upstream", "127.0.0.1:1", "--drain-timeout", "30s")
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout


def test_check_names_a_bad_framing_setting_and_accepts_the_presets() -> None:
    args = ["node", "--check", "--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:1"]
    bad = run_pmlb(*args, "--framing", "length-field:offset=1,size=2,strip=3")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "pmlb node: error: framing 'length-field:offset=1,size=2,strip=3': strip must be 0 "
        "(upstreams get and send whole messages) or the size of a fixed length field at offset 0"
    )
    for framing in ("mqtt", "modbus-tcp", "smpp", "stomp", "delimiter:hex=00,keep=yes"):
        ok = run_pmlb(*args, "--framing", framing)
        assert ok.returncode == 0, (framing, ok.stderr)
