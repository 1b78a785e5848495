"""A/B: a node's CPU per message, two source trees, in one run, alternated.

`make bench` compares pmlb with HAProxy within one run; comparing two runs of
it (before and after a change) mixes in how busy the shared machine was at
each time, which on these 2-core VMs moves a row by 10-30 %. This runs both
trees' nodes (each in front of its own two echo upstreams, as `make bench`
starts them) side by side and measures them in turns, ABAB then BABA, so
both see the same moments; the figure is the median of the per-round ratios.

    git worktree add /tmp/before <rev>
    .venv/bin/python scripts/bench/ab.py --tree before=/tmp/before --tree after=. \
        --rounds 6 --case 1000x4x64 --case 100x16x1024

Each tree runs from its own ``node/`` with this checkout's virtualenv (its
libraries, not its pmlb). Prints one line per round and a table at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # the sibling script, not a package

ROOT = Path(__file__).resolve().parents[2]


def _case(text: str) -> tuple[int, int, int]:
    try:
        conns, inflight, size = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want CONNSxINFLIGHTxSIZE") from None
    return conns, inflight, size


def _tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    tree = Path(path).resolve()
    if not sep or not name or not (tree / "node" / "pmlb").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=PATH, PATH a pmlb checkout")
    return name, tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", type=_tree, action="append", required=True, help="NAME=PATH (two)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--case", type=_case, action="append", help="CONNSxINFLIGHTxSIZE")
    ap.add_argument("--measure", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--bindir", default=str(ROOT / ".venv" / "bench-bin"))
    ap.add_argument(
        "--transport",
        default=bench_run.TRANSPORTS[0],
        help="--link-transport of both nodes (a tree older than it needs one it knows)",
    )
    args = ap.parse_args()
    if len(args.tree) != 2:
        ap.error("give exactly two --tree")
    cases = args.case or [(1000, 4, 64), (100, 16, 1024), (100, 1, 64), bench_run.BULK_CASE]
    names = [name for name, _ in args.tree]
    benches, targets = {}, {}
    try:
        for name, tree in args.tree:
            # The node and its upstreams are spawned with this environment.
            os.environ["PYTHONPATH"] = f"{tree / 'node'}:{tree}"
            b = bench_run.Bench(Path(args.bindir), True)
            b.echo_port = bench_run.free_port()
            benches[name] = b
            targets[name] = b._start_pmlb(args.transport)
        cpu: dict[str, dict[tuple[int, int, int], list[float]]] = {
            n: {c: [] for c in cases} for n in names
        }
        for r in range(args.rounds):
            for c in cases:
                for n in names if r % 2 == 0 else names[::-1]:
                    m = benches[n].echo_case(targets[n], *c, 0.5, args.measure)
                    cpu[n][c].append(m.get("proxy_cpu_per_msg_us") or float("nan"))
            print(
                f"round {r + 1}: "
                + "; ".join(
                    f"{'x'.join(map(str, c))} "
                    + " ".join(f"{n} {cpu[n][c][-1]:.2f}" for n in names)
                    for c in cases
                ),
                flush=True,
            )
    finally:
        for b in benches.values():
            b.stop_all()
    a, b2 = names
    print(f"\n| case | {a} CPU/msg (median) | {b2} CPU/msg (median) | {b2}/{a}, median of rounds |")
    print("|---|---|---|---|")
    for c in cases:
        both = zip(cpu[a][c], cpu[b2][c], strict=True)
        pairs = [(x, y) for x, y in both if not (math.isnan(x) or math.isnan(y))]
        if not pairs:
            print(f"| {'x'.join(map(str, c))} | - | - | - |")
            continue
        ratio = statistics.median(y / x for x, y in pairs)
        print(
            f"| {'x'.join(map(str, c))} | {statistics.median(x for x, _ in pairs):.2f} µs "
            f"| {statistics.median(y for _, y in pairs):.2f} µs | {ratio:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
