"""README's partitions table is the last run's output (make test-partitions
splices it in with scripts/splice_table.py), and has one row per scenario the
suite records."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "splice_table.py"


def test_splice_replaces_only_what_is_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- partitions -->\n| old |\n<!-- /partitions -->\nb\n")
    table = tmp_path / "t.md"
    table.write_text("| scenario |\n|---|\n| new |\n")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "partitions", str(table), str(readme)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert readme.read_text() == (
        "a\n<!-- partitions -->\n| scenario |\n|---|\n| new |\n<!-- /partitions -->\nb\n"
    )
    # A run that recorded nothing leaves README as it was, and says so.
    table.write_text("")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "partitions", str(table), str(readme)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert "no figures" in r.stderr
    assert "| new |" in readme.read_text()


def _prefix(arg: ast.expr) -> str:
    """The fixed start of a scenario name (an f-string's first literal part)."""
    if isinstance(arg, ast.Constant):
        return str(arg.value)
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return ""


def test_readme_has_a_row_per_recorded_partition_scenario() -> None:
    """Each README row names a scenario of the suite (a record() call's name,
    or a parametrized label), and each named record() call has a row."""
    tree = ast.parse((ROOT / "tests" / "partitions" / "test_partitions.py").read_text())
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "record" and n.args
    ]
    named = [_prefix(c.args[0]) for c in calls if not isinstance(c.args[0], ast.Name)]
    labels = [
        str(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) >= 10
    ]
    assert len(named) >= 4, "test_partitions.py records its scenarios"
    assert all(named), "every named scenario starts with fixed text"
    text = (ROOT / "README.md").read_text()
    a = text.index("<!-- partitions -->\n") + len("<!-- partitions -->\n")
    rows = text[a : text.index("<!-- /partitions -->")].strip().splitlines()[2:]
    scenarios = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert all(any(s.startswith(p) for p in labels) for s in scenarios), scenarios
    assert all(any(s.startswith(p) for s in scenarios) for p in named), (scenarios, named)
