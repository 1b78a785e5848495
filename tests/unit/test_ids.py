"""Marks: unique, printable, name their node, parse back."""

from __future__ import annotations

import pytest

from pmlb.errors import InvalidMark
from pmlb.protocol.ids import MarkFactory, node_of, parse_mark, worker_of


def test_marks_are_unique_and_name_their_node() -> None:
    f = MarkFactory("edge-1.example.com")
    marks = [f.next() for _ in range(10_000)]
    assert len(set(marks)) == len(marks)
    assert all(node_of(m) == "edge-1.example.com" for m in marks)
    assert all(m.isprintable() and " " not in m for m in marks)
    assert parse_mark(marks[-1]).counter == 10_000


def test_restart_gives_new_marks() -> None:
    # A new process draws a new boot id, so counters restarting at 1 never collide.
    a, b = MarkFactory("n1"), MarkFactory("n1")
    assert a.boot != b.boot
    assert a.next() != b.next()


@pytest.mark.parametrize(
    "bad",
    ["", "n1", "n1.abc.1", "n1.abcdefghijklm.", "bad id.abcdefghijklm.1", "n1.ABCDEFGHIJKLM.1"],
)
def test_malformed_marks_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidMark):
        parse_mark(bad)


def test_invalid_node_id_is_rejected() -> None:
    with pytest.raises(InvalidMark):
        MarkFactory("has space")


def test_a_workers_marks_name_the_node_and_the_worker() -> None:
    f = MarkFactory("n1.example", worker=3)
    mark = f.next()
    parsed = parse_mark(mark)
    assert parsed.node_id == "n1.example", "the node the operator named, not a worker id"
    assert parsed.worker == 3
    assert worker_of(mark) == 3
    assert worker_of(MarkFactory("n1").next()) is None
    assert worker_of("not a mark") is None
    with pytest.raises(InvalidMark):
        parse_mark("n1.w-abcdefghijklm.1")
