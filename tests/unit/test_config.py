"""Configuration: flags, PMLB_* variables and TOML agree; bad values are one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pmlb.commands.cli import build_parser
from pmlb.config import NODE_OPTIONS, node_config, parse_duration, parse_size, resolve
from pmlb.errors import ConfigError


def _cfg(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["node", *argv])
    return node_config(resolve(NODE_OPTIONS, args, env or {}))


def test_flags() -> None:
    c = _cfg(
        [
            "--listen",
            "127.0.0.1:9000",
            "--upstream",
            "u1=127.0.0.1:7001",
            "--upstream",
            "127.0.0.1:7002",
            "--framing",
            "len16",
            "--node-id",
            "n1",
        ]
    )
    assert c.listen == (("127.0.0.1", 9000),)
    assert [(u.id, u.addr) for u in c.upstreams] == [
        ("u1", "127.0.0.1:7001"),
        ("127.0.0.1:7002", "127.0.0.1:7002"),
    ]
    assert c.framing == "len16"
    assert c.node_id == "n1"


def test_env_and_file_with_precedence(tmp_path: Path) -> None:
    f = tmp_path / "pmlb.toml"
    f.write_text(
        'listen = "127.0.0.1:9000"\nupstream = ["127.0.0.1:7001"]\n'
        'max-frame = 1000\nframing = "line"\nwindow = 4096\n'
    )
    env = {"PMLB_CONFIG": str(f), "PMLB_MAX_FRAME": "2000"}
    c = _cfg(["--window", "8192"], env)
    assert c.framing == "line"  # file
    assert c.max_frame == 2000  # env beats file
    assert c.window == 8192  # flag beats all
    assert c.listen == (("127.0.0.1", 9000),)


def test_env_lists_are_comma_separated() -> None:
    c = _cfg([], {"PMLB_LISTEN": "127.0.0.1:1,127.0.0.1:2", "PMLB_UPSTREAM": "a=h:1, b=h:2"})
    assert len(c.listen) == 2
    assert [u.id for u in c.upstreams] == ["a", "b"]


def test_push_upstreams_take_a_comma_list_as_well_as_repeats() -> None:
    """``--push-upstreams js1,py1`` named one upstream called "js1,py1" (so
    both were refused, with a log line blaming --push-upstreams)."""
    base = ["--listen", "h:1", "--upstream", "h:1"]
    c = _cfg([*base, "--push-upstreams", "js1,py1", "--push-upstreams", "u3"])
    assert c.push_upstreams == ("js1", "py1", "u3")
    assert _cfg(base, {"PMLB_PUSH_UPSTREAMS": "a, b"}).push_upstreams == ("a", "b")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", "h:1"], "--listen HOST:PORT is required"),
        (["--listen", "nope", "--upstream", "h:1"], "HOST:PORT"),
        (["--listen", "h:1"], "at least one --upstream"),
        (["--listen", "h:1", "--upstream", "h:1", "--etcd", "http://e:1"], "not both"),
        (["--listen", "h:1", "--upstream", "h:1", "--max-frame", "-3"], "--max-frame"),
        (["--listen", "h:1", "--upstream", "h:1", "--framing", "xml"], "unknown framing 'xml'"),
        (["--listen", "h:1", "--upstream", "h:1", "--node-id", "a b"], "--node-id"),
        (["--listen", "h:1", "--upstream", "h:1", "--max-connections", "-1"], "0 or more"),
        (["--listen", "h:1", "--upstream", "h:1", "--accept-rate", "nan"], "0 or more"),
        (
            ["--listen", "h:1", "--upstream", "h:1", "--framing", "len16", "--max-frame", "99999"],
            "65535",
        ),
    ],
)
def test_bad_values_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(argv)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("lisen = 'x'\n")
    with pytest.raises(ConfigError, match="unknown option 'lisen'"):
        _cfg(["--config", str(f)])


def test_cli_exits_2_with_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pmlb", "node", "--listen", "bad"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "HOST:PORT" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "pmlb", "node", "--bogus"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("1.5", 1.5)],
)
def test_durations_take_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64KiB", 65536), ("1MiB", 1 << 20), ("512k", 512 << 10), ("10MB", 10**7)],
)
def test_sizes_take_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_units_everywhere_a_flag_variable_or_file_takes_one(tmp_path: Path) -> None:
    """--drain-timeout 30s and --window 1M were refused; now flags, PMLB_* and
    TOML all take units, and bare numbers keep working."""
    conf = tmp_path / "node.toml"
    conf.write_text('replay-buffer = "2MiB"\nidle-timeout = "5m"\nack-timeout = 2\n')
    c = _cfg(
        [
            "--listen",
            "127.0.0.1:9000",
            "--upstream",
            "127.0.0.1:7001",
            "--drain-timeout",
            "30s",
            "--window",
            "1MiB",
            "--config",
            str(conf),
        ],
        {"PMLB_CONNECT_TIMEOUT": "750ms", "PMLB_MAX_FRAME": "16KiB"},
    )
    assert c.drain_timeout == 30.0
    assert c.window == 1 << 20
    assert c.connect_timeout == 0.75
    assert c.max_frame == 16 << 10
    assert c.replay_buffer == 2 << 20
    assert c.idle_timeout == 300.0
    assert c.ack_timeout == 2.0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--window", "1 parsec"), ("--drain-timeout", "30 fortnights"), ("--lease-ttl", "500ms")],
)
def test_bad_units_are_one_clear_line(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _cfg(["--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:7001", flag, value])


def test_each_option_is_declared_once() -> None:
    """Issue [18]: an option was written three times (Option, a NodeConfig
    field with its own default, a line in node_config). Now each NodeConfig
    field carries its Option (metadata) and no default of its own;
    NODE_OPTIONS is read off the fields, and node_config fills every field
    from its option's resolved value but the few it derives."""
    import dataclasses

    from pmlb.config import NodeConfig
    from pmlb.protocol.wire import DEFAULT_WINDOW

    fields = dataclasses.fields(NodeConfig)
    assert all(f.default is dataclasses.MISSING for f in fields)
    assert tuple(f.metadata["option"] for f in fields) == NODE_OPTIONS
    names = {f.name for f in fields}
    assert names == ({o.dest for o in NODE_OPTIONS} - {"upstream"}) | {"upstreams"}
    c = _cfg(["--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:7001"])
    defaults = {o.dest: o.default for o in NODE_OPTIONS}
    assert c.window == defaults["window"] == DEFAULT_WINDOW
    assert c.replay_buffer == defaults["replay_buffer"]
    # Secrets stay out of the config's repr (and so out of logs).
    secret = _cfg(["--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:7001",
                   "--admin-token", "s3cret-admin", "--upstream-token", "s3cret-up"])  # fmt: skip
    assert "s3cret" not in repr(secret)


def test_the_move_timeout_is_its_own_setting() -> None:
    """--ack-timeout meant two things, the link's hung-peer watchdog and how
    long a move waits for the old upstream; --move-timeout is the second."""
    c = _cfg(["--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:7001",
              "--move-timeout", "750ms"])  # fmt: skip
    assert (c.ack_timeout, c.move_timeout) == (5.0, 0.75)
