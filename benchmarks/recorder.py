"""What polydatum.recorder costs: S1, S2 and S4 of core.py with a Recorder installed and not, in one run.

Run: python benchmarks/recorder.py [--quick]

Columns:
  off       no recorder (core.py's numbers)
  shape     only the shape a Recorder gives a manager: an outermost context middleware that
            registers a commit hook, and a pass-through method middleware
  recorder  Recorder().install(dm): every context and DAL call recorded (the last 200 kept)
Extra per context = S1 - S1(off); extra per DAL call = ((S4 - S1) - (S4 - S1)(off)) / 10.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from core import LOOPS, ROUNDS, Bench, baseline, make_dm, s1, s2, s4

from polydatum.recorder import Recorder

COLUMNS = ("off", "shape", "recorder")


def shape(ctx: Any) -> Iterator[None]:
    yield
    ctx.on_commit(int)


def passthrough(request: Any, handler: Any) -> Any:
    return handler(request)


def main() -> None:
    dms = {column: make_dm() for column in COLUMNS}
    dms["shape"].register_context_middleware(shape, outermost=True)
    dms["shape"].register_method_middleware(passthrough, outermost=True)
    recorder = Recorder().install(dms["recorder"])
    bench = Bench()
    bench.add("baseline", baseline)
    for column, dm in dms.items():
        for key, make in (("S1", s1), ("S2", s2), ("S4", s4)):
            bench.add(f"{key} {column}", make(dm))
    best = bench.run()
    print(f"baseline {best['baseline']:.0f} ns; {ROUNDS} rounds of {LOOPS}; ns per context")
    print(f"{'':4}" + "".join(f"{c:>10}" for c in COLUMNS))
    for key in ("S1", "S2", "S4"):
        print(f"{key:4}" + "".join(f"{best[f'{key} {c}']:10.0f}" for c in COLUMNS))
    off_calls = best["S4 off"] - best["S1 off"]
    print("extra per context " + "".join(f"{best[f'S1 {c}'] - best['S1 off']:10.0f}" for c in COLUMNS))
    per_call = "".join(f"{((best[f'S4 {c}'] - best[f'S1 {c}']) - off_calls) / 10:10.0f}" for c in COLUMNS)
    print("extra per call    " + per_call)
    print(f"kept: {len(recorder.contexts())} contexts (limit {recorder.limit})")


if __name__ == "__main__":
    main()
