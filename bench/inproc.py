"""bnfix in process, after its imports, against the plain copy of the same file.

The whole-process numbers mix start-up (interpreter, imports) with the work.  This takes the
start-up out: ``import bnfix`` once (timed on its own), then interleave ``bnfix.patch(...)`` +
``.save(..., sync=False)`` with one whole-file ``copy_file_range`` of the same caffemodel, and
``.save()`` (fsync) with the copy + ``fsync``.  The copies are the anatomy's own reference
variants (``anatomy.py``), so both measurements share one definition of the floor.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import anatomy
from harness import clear_dir, interleave, pairwise_medians, quiesce

Timing = dict[str, float]


def measure(prototxt: str, caffemodel: str, outdir: Path, rounds: int,
            settle_s: float | None) -> dict[str, object]:
    t0 = time.perf_counter()
    import bnfix  # timed on purpose, after t0

    import_s = time.perf_counter() - t0
    proto_out, model_out = outdir / "out.prototxt", outdir / "out.caffemodel"
    base = {phase: next(v for v in anatomy.VARIANTS if v.phase == phase)
            for phase in ("warm", "durable")}
    size = Path(caffemodel).stat().st_size

    def run_bnfix(sync: bool) -> Callable[[], Timing]:
        def go() -> Timing:
            a = time.perf_counter()
            result = bnfix.patch(prototxt, caffemodel)
            b = time.perf_counter()
            result.save(str(proto_out), str(model_out), sync=sync)
            c = time.perf_counter()
            return {"total": c - a, "patch": b - a, "save": c - b}
        return go

    def run_copy(phase: str) -> Callable[[], Timing]:
        def go() -> Timing:
            t = anatomy.run(base[phase], caffemodel, str(model_out), anatomy.whole(size, 0))
            return {"total": t.seconds}
        return go

    def before() -> None:
        clear_dir(outdir)
        quiesce(settle_s)

    phases = {"warm": {"bnfix.patch+save(sync=False)": run_bnfix(False),
                       base["warm"].key: run_copy("warm")},
              "durable": {"bnfix.patch+save()": run_bnfix(True),
                          base["durable"].key: run_copy("durable")}}
    out: dict[str, object] = {"import_s": import_s}
    for phase, ops in phases.items():
        samples = interleave(ops, rounds, before)
        totals = {k: [s["total"] for s in v] for k, v in samples.items()}
        first = next(iter(ops))
        out[phase] = {
            "medians": {k: statistics.median(v) for k, v in totals.items()},
            "ratio": pairwise_medians(totals, base[phase].key)[first],
            "patch_median_s": statistics.median(s["patch"] for s in samples[first]),
            "save_median_s": statistics.median(s["save"] for s in samples[first]),
            "samples": samples}
    clear_dir(outdir)
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def main(argv: list[str]) -> int:
    """``bench.py inproc PROTOTXT CAFFEMODEL OUTDIR``: print the measurement as one JSON line."""
    p = argparse.ArgumentParser(prog="bench.py inproc")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("outdir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--no-sync", action="store_true")
    args = p.parse_args(argv)
    res = measure(args.prototxt, args.caffemodel, Path(args.outdir), args.rounds,
                  None if args.no_sync else args.settle)
    print(json.dumps(res))
    return 0
