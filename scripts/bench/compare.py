"""Compare `make bench` runs of two versions by their ratios to HAProxy.

Usage: python scripts/bench/compare.py BEFORE.json [...] -- AFTER.json [...]

Each run's figures are ratios to HAProxy measured in that same run (these
2-core machines are shared and noisy: absolute figures move between runs,
ratios less); several runs per side are averaged. Prints one Markdown table:
per case, the mean ratio before and after and the change. Idle memory is
absolute (bytes per idle mark: HAProxy's does not move).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean
from typing import Any


def figures(run: dict[str, Any], target: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for case, rows in run["echo"].items():
        if target in rows and "haproxy" in rows:
            out[f"CPU/msg {case}"] = (
                rows[target]["proxy_cpu_per_msg_us"] / rows["haproxy"]["proxy_cpu_per_msg_us"]
            )
    bulk = run.get("bulk", {})
    if target in bulk and "haproxy" in bulk:
        out["bulk CPU/MB"] = (
            bulk[target]["proxy_cpu_per_mb_us"] / bulk["haproxy"]["proxy_cpu_per_mb_us"]
        )
    idle = run.get("idle", {})
    if target in idle and "haproxy" in idle:
        out["CPU/accept"] = (
            idle[target]["proxy_cpu_per_accept_us"] / idle["haproxy"]["proxy_cpu_per_accept_us"]
        )
        out["RSS/idle mark (bytes)"] = float(idle[target]["rss_per_conn_bytes"])
    return out


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    sides = [argv[:cut], argv[cut + 1 :]]
    for target in ("pmlb", "pmlb-grpcio"):
        before, after = (
            [figures(json.loads(Path(p).read_text()), target) for p in side] for side in sides
        )
        print(f"\n{target}: {len(before)} run(s) before, {len(after)} after\n")
        print("| figure | before | after | change |")
        print("|---|---|---|---|")
        for key in before[0]:
            b = mean(r[key] for r in before if key in r)
            a = mean(r[key] for r in after if key in r)
            unit = "" if "bytes" in key else "x"
            fmt = "{:.0f}" if "bytes" in key else "{:.2f}"
            change = f"{100 * (a / b - 1):+.0f}%"
            print(f"| {key} | {fmt.format(b)}{unit} | {fmt.format(a)}{unit} | {change} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
