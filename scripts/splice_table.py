"""Put a table a run measured into README, between ``<!-- NAME -->`` and
``<!-- /NAME -->``: the partition suite's figures (``make test-partitions``
writes them with PMLB_FIGURES_OUT and calls this), so README shows the last
run's numbers and nobody pastes them by hand.

Usage: python scripts/splice_table.py NAME TABLE_FILE [README]
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def splice(text: str, name: str, table: str) -> str:
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"README has no <!-- {name} --> ... <!-- /{name} --> markers")
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + table.rstrip("\n") + "\n" + text[b:]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    name, table_file = argv[0], Path(argv[1])
    readme = Path(argv[2]) if len(argv) == 3 else README
    table = table_file.read_text() if table_file.exists() else ""
    if not table.strip():
        print(f"{table_file}: no figures recorded; README unchanged", file=sys.stderr)
        return 1
    readme.write_text(splice(readme.read_text(), name, table))
    print(f"README: <!-- {name} --> table from {table_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
