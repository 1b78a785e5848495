"""Figures the fault suite reports, printed as a table at the end of the run."""

from __future__ import annotations

import os
from typing import Any

ROWS: list[dict[str, Any]] = []


def record(scenario: str, **figures: Any) -> None:
    # Link-level tests run once per Bridge transport (tests/conftest.py): say which.
    transport = os.environ.get("PMLB_LINK_TRANSPORT")
    if transport:
        scenario = f"{scenario} [{transport}]"
    ROWS.append({"scenario": scenario, **figures})


def table() -> str:
    if not ROWS:
        return ""
    cols = [
        "scenario",
        "connections",
        "held",
        "sent",
        "lost",
        "duplicated",
        "reprocessed",
        "detection_s",
        "recovery_s",
        "failovers",
        "converged",
        "note",
    ]
    # Columns no row of this run filled are left out (the fault suite has no
    # detection or convergence figures; the partition suite has them).
    cols = [c for c in cols if c == "scenario" or any(c in row for row in ROWS)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in ROWS:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
