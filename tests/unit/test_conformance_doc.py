"""The conformance kit's cases and proto/README.md cannot drift: every case
links to a section that exists, and the page's table lists every case."""

from __future__ import annotations

import re

from pmlb.testing.conformance_kit import CASES
from tests.support import ROOT

PAGE = (ROOT / "proto" / "README.md").read_text()


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_case_links_to_a_section_of_the_page() -> None:
    anchors = {anchor(h) for h in re.findall(r"^#+ (.+)$", PAGE, flags=re.M)}
    missing = {c.name: c.section for c in CASES if c.section not in anchors}
    assert missing == {}


def test_the_page_lists_every_case_and_no_other() -> None:
    table = PAGE[PAGE.index("| case |") :]
    listed = re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M)
    assert listed == [c.name for c in CASES]
