"""Every figure in a fault or partition table is measured: no ``record()``
call in the tests types a count (or a "converged" verdict) as a literal.

A column that cannot be measured is left out of a row, not filled in; the
tables are printed at the end of each run and spliced into README.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

# The columns of tests/faults/report.py that state what was counted or checked.
MEASURED = (
    "connections",
    "held",
    "sent",
    "lost",
    "duplicated",
    "reprocessed",
    "failovers",
    "detection_s",
    "recovery_s",
    "converged",
)


def literal_figures(source: str, name: str) -> list[str]:
    """``file:line: column=value`` for each record() keyword given a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if called != "record":
            continue
        for kw in node.keywords:
            if kw.arg in MEASURED and isinstance(kw.value, ast.Constant):
                found.append(f"{name}:{kw.value.lineno}: {kw.arg}={kw.value.value!r}")
    return found


def test_no_record_call_types_a_figure() -> None:
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found += literal_figures(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "figures typed in, not measured:\n" + "\n".join(found)


def test_the_check_finds_a_typed_figure() -> None:
    src = 'record("x", connections=150, held=n, note="150 typed")\nrecord("y", converged="yes")'
    assert literal_figures(src, "t.py") == ["t.py:1: connections=150", "t.py:2: converged='yes'"]


def test_the_check_reads_every_test_directory() -> None:
    dirs = {p.parent.name for p in (ROOT / "tests").rglob("test_*.py")}
    assert {"faults", "integration", "partitions", "e2e", "unit"} <= dirs
    assert Path(__file__).parent.name == "unit"
