"""What h2 pays per received DATA frame for a log line it does not write:
``repr(frame)`` with hyperframe's own body repr vs pmlb's (libpatch).

Usage: python scripts/bench/frame_repr.py   (prints a Markdown table)
node/docs/upstream-reports/hyperframe-frame-repr.md quotes a run of it.
"""

from __future__ import annotations

import timeit

import hyperframe.frame as hf

from pmlb.transport import libpatch


def main() -> None:
    print("| DATA frame body | hyperframe's repr | pmlb's repr | ratio |")
    print("|---|---|---|---|")
    for size in (64, 16 << 10, 1 << 20):
        frame = hf.DataFrame(1, data=b"x" * size)
        results = []
        for fn in (libpatch.LIBRARY_RAW_DATA_REPR, libpatch.raw_data_repr):
            hf._raw_data_repr = fn
            n = max(10, 2_000_000 // max(size, 1024))
            results.append(min(timeit.repeat(lambda f=frame: repr(f), number=n, repeat=5)) / n)
        hf._raw_data_repr = libpatch.raw_data_repr
        lib, ours = results
        print(f"| {size} B | {lib * 1e6:.2f} µs | {ours * 1e6:.2f} µs | {lib / ours:.1f}x |")


if __name__ == "__main__":
    main()
