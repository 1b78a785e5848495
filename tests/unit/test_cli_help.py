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
    "conformance",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command: str) -> None:
    args = [sys.executable, "-m", "pmlb", *([command] if command else []), "--help"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_output_into_a_closed_pipe_is_not_an_error() -> None:
    """`pmlb conformance --list | head -1` printed "pmlb conformance: [Errno
    32] Broken pipe": a reader that stops early is not a failure of ours."""
    r = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m pmlb conformance --list | head -1"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.stdout.startswith("hello "), r.stdout
    assert r.stderr == "", r.stderr


def test_node_help_is_in_sections_and_every_option_has_one() -> None:
    """`pmlb node --help` was one ungrouped list of 65 options (issue [17]):
    it prints HELP_GROUPS' sections, in order, and no node option is left
    outside them (a new option must be given a section)."""
    from pmlb.config import HELP_GROUPS, NODE_OPTIONS

    sectioned = {name for names in HELP_GROUPS.values() for name in names}
    assert {o.name for o in NODE_OPTIONS} <= sectioned, "give the new option a HELP_GROUPS section"
    r = subprocess.run(
        [sys.executable, "-m", "pmlb", "node", "--help"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    headings = [line[:-1] for line in r.stdout.splitlines() if line and line[0] != " "]
    headings = [h for h in headings if h in HELP_GROUPS]
    assert headings == list(HELP_GROUPS), headings
    listener = r.stdout.split("\nlistener:\n", 1)[1].split("\n\n", 1)[0]
    assert "--listen LISTEN" in listener
    assert "--etcd ETCD" not in listener


def test_check_reports_every_problem_at_once() -> None:
    """`--check` stopped at the first kind of problem: a bad --listen hid the
    --etcd + --upstream conflict and a bad --upstream (issue [17])."""
    r = subprocess.run(
        [sys.executable, "-m", "pmlb", "node", "--check", "--listen", "127.0.0.1:99999",
         "--upstream", "nope", "--etcd", "http://127.0.0.1:2379", "--log-level", "loud"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert any("port 99999" in line and "out of range" in line for line in lines), lines
    assert any("'nope' is not HOST:PORT" in line for line in lines), lines
    assert any("not both" in line for line in lines), lines
    assert any("--log-level 'loud'" in line for line in lines), lines
    assert not any("--listen HOST:PORT is required" in line for line in lines), "said once"
    assert all(line.startswith("pmlb node: error: ") for line in lines), lines
