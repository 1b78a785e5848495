"""`pmlb upstream add` as an operator types it: ids the keys can hold,
addresses with errors that say what is wrong, and no silent overwrite
(issue [17]: it wrote 'u 2', which `ls` then showed as MALFORMED, and
overwrote an existing id, losing its weight)."""

from __future__ import annotations

from tests.conftest import Etcd
from tests.support import run_pmlb


def _pmlb(etcd: Etcd, *args: str) -> tuple[int, str, str]:
    r = run_pmlb(*args, "--etcd", etcd.url, "--etcd-prefix", etcd.prefix)
    return r.returncode, r.stdout, r.stderr


def test_ids_and_addresses_are_checked_before_anything_is_written(etcd: Etcd) -> None:
    code, _, err = _pmlb(etcd, "upstream", "add", "echo", "u 2", "127.0.0.1:7001")
    assert code == 2
    assert "upstream id 'u 2': use 1-128 letters" in err
    code, _, err = _pmlb(etcd, "upstream", "add", "echo", "u2", "localhost")
    assert code == 2
    assert "upstream address: 'localhost' is not HOST:PORT" in err
    code, _, err = _pmlb(etcd, "upstream", "add", "echo", "u2", "127.0.0.1:99999")
    assert code == 2
    assert "port 99999 in '127.0.0.1:99999' is out of range" in err
    code, _, err = _pmlb(etcd, "upstream", "add", "echo", "u2", "127.0.0.1:7001", "--weight", "0")
    assert code == 2
    assert "--weight 0: use 1-10000" in err
    assert etcd.keys("/services/") == [], "nothing written"


def test_add_never_overwrites_without_replace(etcd: Etcd) -> None:
    assert _pmlb(etcd, "upstream", "add", "echo", "u1", "127.0.0.1:7001", "--weight", "5")[0] == 0
    before = etcd.get("/services/echo/upstreams/u1")
    code, _, err = _pmlb(etcd, "upstream", "add", "echo", "u1", "127.0.0.1:7002")
    assert code == 1
    assert "upstream u1 of service echo exists" in err
    assert "--replace" in err
    assert etcd.get("/services/echo/upstreams/u1") == before, "weight 5 kept"
    code, out, _ = _pmlb(etcd, "upstream", "add", "echo", "u1", "127.0.0.1:7002", "--replace")
    assert code == 0, out
    assert etcd.get("/services/echo/upstreams/u1") == "127.0.0.1:7002"
    code, out, _ = _pmlb(etcd, "upstream", "ls", "echo")
    assert "MALFORMED" not in out


def test_help_says_what_weight_and_replace_do() -> None:
    out = run_pmlb("upstream", "--help").stdout
    assert "--weight WEIGHT" in out
    assert "share of new marks" in out
    assert "--replace" in out
