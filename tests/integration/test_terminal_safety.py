"""Values from etcd reach operators' terminals through `pmlb status` and
`pmlb upstream ls`: whoever can write etcd must not be able to drive those
terminals (security review, finding 10)."""

from __future__ import annotations

import json

from tests.conftest import Etcd


def test_etcd_values_cannot_drive_the_terminal(etcd: Etcd) -> None:
    """Security review, finding 10: a value in etcd with terminal escapes
    (ESC ] 0; sets a window title; others move the cursor or recolour) was
    printed raw by `pmlb status`, and a newline forged a row. Every
    etcd-sourced field is shown with its control characters escaped."""
    esc = "\x1b]0;pwned\x07\x1b[2J"
    etcd.put(
        "/nodes/evil",
        json.dumps({"listen": [f"127.0.0.1:9{esc}"], "services": [f"echo\nforged row{esc}"]}),
    )
    etcd.put("/services/echo/upstreams/u1", "127.0.0.1:7001")
    etcd.put(f"/services/echo/upstreams/bad{esc}", f"127.0.0.1:7002{esc}")
    for args in (("status",), ("upstream", "ls", "echo")):
        out = etcd.pmlb(*args)
        assert "\x1b" not in out, (args, out)
        assert "\x07" not in out, (args, out)
        assert "\\x1b]0;pwned" in out, "shown, escaped, not hidden"
        assert not any(line.startswith("forged row") for line in out.splitlines()), out
