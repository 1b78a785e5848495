"""The README's option tables are generated from the option declarations."""

from __future__ import annotations

import subprocess
import sys

from pmlb.config import NODE_OPTIONS, RELOADABLE, NodeConfig
from tests.support import ROOT


def test_readme_option_tables_match_the_declarations() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_every_reloadable_option_is_a_config_field() -> None:
    assert set(NodeConfig.__dataclass_fields__) >= RELOADABLE
    assert {o.env for o in NODE_OPTIONS} == {"PMLB_" + o.dest.upper() for o in NODE_OPTIONS}


def test_the_grafana_dashboard_is_what_its_generator_writes() -> None:
    import importlib.util

    script = ROOT / "scripts" / "gen_grafana.py"
    spec = importlib.util.spec_from_file_location("gen_grafana", script)
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.render(), "run make docs"
