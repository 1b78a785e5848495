"""Marks and node ids.

A mark is ``<node id>.<boot>.<counter>``:

* ``node id`` names the owning node (so anyone can route to it via etcd);
* ``boot`` is 64 random bits drawn once per process start, base32 (13 chars),
  which makes marks unique across restarts without any coordination; in a
  node of several worker processes (``--workers``) it starts with the worker's
  index, ``w<i>-`` (``n1.w1-q4dz2mpxbwr7k.1f``), so the node can hand a call
  for the mark to the worker that holds it;
* ``counter`` counts connections within the process, base36.

Making a mark is a string format of an int: no lock, no I/O, no etcd round trip.
Node ids may contain dots, so a mark is split from the right.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import NamedTuple

from pmlb.errors import InvalidMark

NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_BOOT_RE = re.compile(r"^(?:w([0-9]{1,3})-)?[a-z2-7]{13}$")
_COUNTER_RE = re.compile(r"^[0-9a-z]{1,13}$")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def valid_node_id(node_id: str) -> bool:
    """Node ids are DNS-label-ish: letters, digits, '.', '_' and '-', 1 to 63 chars."""
    return NODE_ID_RE.match(node_id) is not None


def _base36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_DIGITS[r])
    return "".join(reversed(out))


class ParsedMark(NamedTuple):
    node_id: str
    boot: str
    counter: int
    worker: int | None = None  # the worker process that holds it, in a node of several


class MarkFactory:
    """Hands out marks for one node process."""

    __slots__ = ("_counter", "_prefix", "boot")

    def __init__(self, node_id: str, boot: str | None = None, worker: int | None = None) -> None:
        if not valid_node_id(node_id):
            raise InvalidMark(f"invalid node id {node_id!r}")
        self.boot = boot or base64.b32encode(secrets.token_bytes(8)).decode()[:13].lower()
        if worker is not None:
            self.boot = f"w{worker}-{self.boot}"
        self._prefix = f"{node_id}.{self.boot}."
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return self._prefix + _base36(self._counter)


def parse_mark(mark: str) -> ParsedMark:
    """Split a mark into its parts; raise InvalidMark when it is not one."""
    parts = mark.rsplit(".", 2)
    if len(parts) != 3:
        raise InvalidMark(f"not a mark: {mark!r}")
    node_id, boot, counter = parts
    matched = _BOOT_RE.match(boot)
    if not (valid_node_id(node_id) and matched and _COUNTER_RE.match(counter)):
        raise InvalidMark(f"not a mark: {mark!r}")
    worker = matched.group(1)
    return ParsedMark(node_id, boot, int(counter, 36), None if worker is None else int(worker))


def node_of(mark: str) -> str:
    """The id of the node that owns ``mark``."""
    return parse_mark(mark).node_id


def worker_of(mark: str) -> int | None:
    """The index of the worker process that holds ``mark`` (None: a node of one
    process, or not a mark)."""
    try:
        return parse_mark(mark).worker
    except InvalidMark:
        return None
