"""Print the fault suite's figures after the run."""

from __future__ import annotations

from typing import Any

from tests.faults.report import table


def pytest_terminal_summary(terminalreporter: Any) -> None:
    text = table()
    if text:
        terminalreporter.write_sep("=", "fault suite figures")
        terminalreporter.write_line(text)
