"""The committed generated code matches proto/ (run `make proto` when this fails)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(out)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    committed = ROOT / "node" / "pmlb" / "_proto"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    have = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == have, "generated file set differs: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `make proto`"


def test_the_nodejs_sdk_carries_the_current_contract() -> None:
    """The Node.js SDK's committed copy of upstream.proto (what an installed
    package reads) is proto/'s, byte for byte: `make proto` copies it."""
    sdk = ROOT / "node" / "upstream-js" / "proto" / "pmlb" / "v1" / "upstream.proto"
    assert sdk.read_bytes() == (ROOT / "proto" / "pmlb" / "v1" / "upstream.proto").read_bytes()
