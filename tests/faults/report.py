"""Figures the fault suite reports, printed as a table at the end of the run."""

from __future__ import annotations

from typing import Any

ROWS: list[dict[str, Any]] = []


def record(scenario: str, **figures: Any) -> None:
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
