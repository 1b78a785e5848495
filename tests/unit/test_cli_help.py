"""Every command's --help works: it is the first thing a newcomer types."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

COMMANDS = [
    "",
    "node",
    "upstream",
    "status",
    "dashboard",
    "demo",
    "echo-upstream",
    "dns-sync",
    "connect",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command: str) -> None:
    args = [sys.executable, "-m", "pmlb", *([command] if command else []), "--help"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
