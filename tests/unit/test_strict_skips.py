"""A test whose tool is missing skips on a developer's machine and fails
under .ci/run (PMLB_TEST_STRICT=1): CI cannot turn green by skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PROBE = """
from tests.support import needs

pytestmark = needs("frobnicator is not installed: apt-get install frobnicator")


def test_uses_the_frobnicator() -> None:
    assert True
"""


@pytest.mark.parametrize(("strict", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_a_missing_tool_skips_here_and_fails_in_ci(
    tmp_path: Path, strict: str, outcome: str
) -> None:
    probe = ROOT / "tests" / "unit" / f"_probe_{os.getpid()}_{strict or 0}_test.py"
    probe.write_text(PROBE)
    try:
        env = {**os.environ, "PMLB_TEST_STRICT": strict}
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
            check=False,
        )
    finally:
        probe.unlink()
    assert outcome in r.stdout, r.stdout[-2000:]
    assert "frobnicator is not installed: apt-get install frobnicator" in r.stdout
    assert (r.returncode == 0) == (outcome == "1 skipped")
