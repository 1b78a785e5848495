"""Regenerate the README's option tables from the option declarations
(``make docs``); tests/unit/test_docs.py fails when they drift.

Usage: python scripts/gen_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from pmlb.config import DNS_SYNC_OPTIONS, ECHO_OPTIONS, NODE_OPTIONS, options_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = {
    "node-options": NODE_OPTIONS,
    "echo-options": ECHO_OPTIONS,
    "dns-sync-options": DNS_SYNC_OPTIONS,
}


def render(text: str) -> str:
    for name, options in TABLES.items():
        start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + options_markdown(options) + text[b:]
    return text


def main() -> int:
    text = README.read_text()
    fresh = render(text)
    if "--check" in sys.argv:
        if fresh != text:
            print("README option tables are stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
