"""The control API sends to and closes any client of the node: like the admin
API, without credentials it serves loopback only (security review, finding
4). Before, ``pmlb node --check --control 0.0.0.0:...`` said OK and List and
Send answered anyone who reached the port."""

from __future__ import annotations

import pytest

from tests.support import run_pmlb

BASE = ["node", "--upstream", "u1=127.0.0.1:1", "--listen", "127.0.0.1:0"]


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize(
    "addr", ["0.0.0.0:9200", "[::]:9200", "192.0.2.21:9200", "lb.example:9200"]
)
def test_an_open_control_api_beyond_loopback_is_refused(addr: str, check: bool) -> None:
    """Refused at --check and at start-up (before anything binds), with the
    way out in the message."""
    r = run_pmlb(*BASE, "--control", addr, *(["--check"] if check else []), timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "is not a loopback address" in r.stderr
    assert "--control-token" in r.stderr


@pytest.mark.parametrize("addr", ["0.0.0.0:9200", "192.0.2.21:9200"])
def test_with_a_token_or_client_certificates_any_address_is_allowed(addr: str) -> None:
    r = run_pmlb(*BASE, "--control", addr, "--check", env={"PMLB_CONTROL_TOKEN": "t0k"})
    assert r.returncode == 0, r.stderr
    r = run_pmlb(
        *BASE,
        "--control",
        addr,
        "--control-cert",
        "c.pem",
        "--control-key",
        "k.pem",
        "--control-client-ca",
        "ca.pem",
        "--check",
    )
    # --check validates the option set, not the files (they are read at start).
    assert "is not a loopback address" not in r.stderr, r.stderr


@pytest.mark.parametrize("addr", ["127.0.0.1:9200", "[::1]:9200", "localhost:9200", "127.0.0.9:1"])
def test_loopback_needs_no_token(addr: str) -> None:
    """The default stays easy: a control API on loopback, no token (as the
    demo and the tests run it)."""
    r = run_pmlb(*BASE, "--control", addr, "--check")
    assert r.returncode == 0, r.stderr
