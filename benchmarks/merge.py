"""polydatum.sync's Differ: ns per key, and the ratio to a plain-Python merge join in the same run.

Run: python benchmarks/merge.py [--quick] [--keys N]

Both sides hold N keys (default 1,000,000; 200,000 with --quick) as
``(key, fingerprint)`` tuples from generators: 10% of the source keys are
missing from the target, 10% have another fingerprint, and the target has 5%
keys of its own. The cases:

  baseline  a hand-written merge join of the two generators: compare keys,
            compare fingerprints, count new/changed/deleted; no checks
  items     Differ over the plain iterables with key= and fingerprint= callables
  sides     Differ over two Side objects that yield (key, item) pairs themselves
            (what BlobSide and StoreSide do), fingerprint by index

Every case is run once per round, interleaved, and the best round kept
(the machine is shared). The Differ checks every key's order on both sides
and builds one Change object per difference, which the baseline does not.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from polydatum.sync import Differ

QUICK = "--quick" in sys.argv
KEYS = (
    int(sys.argv[sys.argv.index("--keys") + 1]) if "--keys" in sys.argv else (200_000 if QUICK else 1_000_000)
)
ROUNDS = 3 if QUICK else 5


def source() -> Iterator[tuple[int, int]]:
    for n in range(KEYS):
        yield n * 2, n


def target() -> Iterator[tuple[int, int]]:
    for n in range(KEYS):
        if n % 10 == 3:
            continue  # new in the source
        yield n * 2, (-n if n % 10 == 7 else n)  # changed
        if n % 20 == 0:
            yield n * 2 + 1, 0  # deleted: the target's own


_END: Any = object()


def baseline() -> tuple[int, int, int]:
    new = changed = deleted = 0
    s_it, t_it = source(), target()
    s = next(s_it, _END)
    t = next(t_it, _END)
    while s is not _END and t is not _END:
        if s[0] == t[0]:
            if s[1] != t[1]:
                changed += 1
            s = next(s_it, _END)
            t = next(t_it, _END)
        elif s[0] < t[0]:
            new += 1
            s = next(s_it, _END)
        else:
            deleted += 1
            t = next(t_it, _END)
    while s is not _END:
        new += 1
        s = next(s_it, _END)
    while t is not _END:
        deleted += 1
        t = next(t_it, _END)
    return new, changed, deleted


def count(differ: Differ[Any, Any]) -> tuple[int, int, int]:
    counts = {"new": 0, "changed": 0, "deleted": 0}
    for change in differ.changes():
        counts[change.kind.value] += 1
    return counts["new"], counts["changed"], counts["deleted"]


def items() -> tuple[int, int, int]:
    return count(Differ(source(), target(), key=itemgetter(0), fingerprint=itemgetter(1)))


class Pairs:
    """A side whose scan already yields (key, item), as the ready-made sides do."""

    def __init__(self, make: Callable[[], Iterator[tuple[int, int]]]) -> None:
        self.make = make

    def scan(self, after: Any = None) -> Iterator[tuple[int, int]]:
        return self.make()

    def fingerprint(self, item: int) -> int:
        return item


def sides() -> tuple[int, int, int]:
    return count(Differ(Pairs(source), Pairs(target)))


CASES: dict[str, Callable[[], tuple[int, int, int]]] = {"baseline": baseline, "items": items, "sides": sides}


def main() -> None:
    expected = baseline()
    for name, case in CASES.items():
        assert case() == expected, name  # the same answer before any timing
    compared = KEYS + KEYS // 20  # keys settled: every source key and the target's own
    best = dict.fromkeys(CASES, float("inf"))
    for _ in range(ROUNDS):
        for name, case in CASES.items():
            gc.collect()
            start = time.perf_counter()
            case()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{KEYS:,} keys a side; new/changed/deleted = {expected}; best of {ROUNDS} rounds")
    base = best["baseline"] / compared * 1e9
    for name in CASES:
        ns = best[name] / compared * 1e9
        print(f"  {name:9} {ns:7.0f} ns per key   {ns / base:5.2f}x baseline")


if __name__ == "__main__":
    main()
