"""Close reasons are one vocabulary: the code's list, the proto's and the README's agree."""

from __future__ import annotations

import re

from pmlb.protocol import reasons
from tests.support import ROOT


def _proto_words() -> set[str]:
    text = (ROOT / "proto/pmlb/v1/upstream.proto").read_text()
    start = text.index("message Close {")
    block = text[start : text.index("string reason = 1;", start)]
    return set(re.findall(r"^  //   ([a-z_]+) ", block, re.M))


def _readme_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- close-reasons -->") : text.index("<!-- /close-reasons -->")]
    return re.findall(r"^\| `([a-z_]+)` \| ([a-z]+) \| (.*) \|$", block, re.M)


def _readme_words() -> set[str]:
    return {w for w, _, _ in _readme_rows()}


def test_proto_and_readme_list_exactly_the_vocabulary() -> None:
    assert _proto_words() == reasons.WORDS, "regenerate the Close.reason comment"
    assert _readme_words() == reasons.WORDS, "update the README's close-reason table"


def test_readme_says_what_the_code_says_of_each_reason() -> None:
    """Who sends it and what it means, word for word (a reason whose meaning
    changed in the code cannot keep its old story in README)."""
    assert _readme_rows() == list(reasons.VOCABULARY)


def test_outside_reasons_are_cleaned_and_labelled() -> None:
    forged = "kicked\n2026-11-29 INFO node/n1 pmlb.app: forged line"
    cleaned = reasons.clean(forged)
    assert "\n" not in cleaned
    assert len(cleaned) <= reasons.MAX_LENGTH
    assert cleaned.startswith("kicked?2026")
    assert reasons.clean("x" * 1000).endswith("...")
    assert reasons.label("kicked") == "other"
    assert reasons.label("client_closed") == "client_closed"
    assert reasons.for_log("kicked") == "'kicked'"
    assert reasons.for_log("poison") == "poison"
