"""A short coverage-guided (atheris) run of every parser of untrusted input, in CI.

`make fuzz` runs the same targets longer. A crash found becomes a regression
test next to the parser's unit tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.parametrize("target", ["framing", "proxy", "etcd-values", "batch", "nghttp2"])
def test_fuzz_target_finds_no_crash(target: str) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), target, "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done " in r.stderr, "the fuzzer actually ran"
