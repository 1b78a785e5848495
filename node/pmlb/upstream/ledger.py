"""An example upstream whose effects are exactly-once across failovers.

Each client message ``add N`` adds N to the client's balance and answers
``balance B``. The balances live in a store every upstream instance shares
(``LedgerStore`` here stands in for a database or Redis). Delivery to
upstreams is at-least-once: a message one instance applied but had not
acknowledged when its link broke arrives again, at another instance, with the
same ``(conn.mark, conn.seq)``. The store applies each key once and remembers
its result, so a replayed message changes nothing and is answered with the
same balance, which is what the client sees exactly once.

With a database, do the same in one transaction: insert ``(mark, seq)`` into a
table with a unique key, apply the effect only if the insert succeeded, and
read back the stored result otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from pmlb.upstream.sdk import Conn, Handler

# Results kept per mark for answering replays: the node replays at most what
# one window of unacknowledged messages holds, far below this.
RECENT: Final = 4096


class LedgerStore:
    """Balances per mark, and the results of recently applied (mark, seq) keys."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.applied: dict[str, OrderedDict[int, int]] = {}
        self.replays = 0  # keys seen again and not re-applied

    def apply(self, mark: str, seq: int, amount: int) -> int:
        """Add ``amount`` to ``mark``'s balance once per ``seq``; the balance after it."""
        done = self.applied.setdefault(mark, OrderedDict())
        if seq in done:
            self.replays += 1
            return done[seq]
        balance = self.balances.get(mark, 0) + amount
        self.balances[mark] = balance
        done[seq] = balance
        if len(done) > RECENT:
            done.popitem(last=False)
        return balance

    def forget(self, mark: str) -> None:
        self.applied.pop(mark, None)


class Ledger(Handler):
    def __init__(self, store: LedgerStore) -> None:
        self.store = store

    def on_message(self, conn: Conn, data: bytes) -> None:
        cmd, _, arg = data.partition(b" ")
        if cmd != b"add" or not arg.lstrip(b"-").isdigit():
            conn.send(b"error: say 'add N'")
            return
        conn.send(b"balance %d" % self.store.apply(conn.mark, conn.seq, int(arg)))
