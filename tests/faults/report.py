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
        "recovery_s",
        "failovers",
        "note",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in ROWS:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
