"""Benchmark bnfix against ``cp`` on YOLOv3-shaped models and on many small pairs.

Usage (from the repository root)::

    python bench/bench.py                      # 30mb, 248mb, 1.9gb, 1,000 small pairs, 5 rounds
    python bench/bench.py --sizes 248mb --rounds 3 --pairs 0 --json /tmp/bench.json
    python bench/bench.py --ci                 # smallest size, one round: checks that it runs

This file only reads the command line and calls the parts, one module each (see README.md):
``generate`` (the models), ``naive`` and ``verify`` (protobuf peers), ``harness`` (timing),
``suite`` (what is timed), ``inproc`` and ``anatomy`` (in-process measurements), ``goals``
and ``tables`` (what is expected, what is printed).  ``gen``, ``verify``, ``naive``, ``inproc``
and ``anatomy`` are also subcommands; the harness runs them as subprocesses.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUBCOMMANDS = {"gen": "generate", "verify": "verify", "naive": "naive", "inproc": "inproc",
               "anatomy": "anatomy"}
CI_PAIRS = 20


def parser() -> argparse.ArgumentParser:
    from generate import SIZES

    p = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark bnfix against cp, whole process and like for "
        "like, on generated YOLOv3-shaped models and many small pairs. Subcommands: "
        + ", ".join(SUBCOMMANDS) + " (bench.py SUB --help).")
    p.add_argument("--sizes", default=",".join(SIZES),
                   help=f"comma-separated, from {', '.join(SIZES)} (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (default 5)")
    p.add_argument("--pairs", type=int, default=1000,
                   help="small pairs in one bnfix call (default 1000; 0 skips them)")
    p.add_argument("--anatomy-rounds", type=int, default=None,
                   help="rounds of the copy anatomy (default: --rounds; 0 skips it)")
    p.add_argument("--no-inproc", action="store_true", help="skip the in-process comparison")
    p.add_argument("--bnfix", metavar="DIR", type=Path,
                   help="import bnfix from DIR (holding the bnfix package) instead of this "
                   "checkout, e.g. `git archive HEAD bnfix | tar -x -C DIR`")
    p.add_argument("--workdir", help="where models are generated (default: $TMPDIR/bnfix-bench)")
    p.add_argument("--json", help="write the raw numbers here, and the README tables beside it "
                   "as .md (default: WORKDIR/results.json)")
    p.add_argument("--regen", action="store_true", help="regenerate the models even if cached")
    p.add_argument("--verify", action="store_true",
                   help="parse each generated model once with real protobuf and check it")
    p.add_argument("--naive-large", action="store_true",
                   help="also time the naive round trip on 1.9gb (~6 GiB of RAM, ~20 s a round)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to pause after the untimed sync before each run (default 1)")
    p.add_argument("--no-sync", action="store_true", help="no sync (and no pause) before each run")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each phase, wait up to S seconds for the CPUs to be idle")
    p.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    p.add_argument("--ci", action="store_true",
                   help=f"smallest size, one round, {CI_PAIRS} small pairs, short pauses, own "
                   "workdir deleted at the end; exit 1 only if something fails to run")
    return p


def run(args: argparse.Namespace) -> int:
    import goals
    import harness
    import suite
    import tables
    from generate import SIZES, SMALLEST

    if args.ci:
        args.sizes, args.rounds, args.pairs, args.verify = SMALLEST, 1, min(args.pairs, CI_PAIRS), True
        args.settle = min(args.settle, 0.05)
        args.workdir = args.workdir or str(Path(tempfile.gettempdir()) / "bnfix-bench-ci")
        args.clean = True
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "bnfix-bench").resolve()
    if HERE == workdir or HERE in workdir.parents:
        raise SystemExit("--workdir must be outside bench/ (generated files stay out of git)")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.bnfix:
        harness.use_bnfix_from(args.bnfix)

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = harness.machine_info(workdir)
    log(f"{info['date_utc']} UTC; {info['nproc']} CPUs, {info['cpu']}, {info['mem_gib']} GiB; "
        f"Python {info['python']}; protobuf {info['protobuf']} (pure Python: "
        f"{info['protobuf_pure_python']}); numpy {info['numpy']}; {info['cp']}")
    log(f"workdir: {workdir} ({info['filesystem']}); bnfix: {info['bnfix']}")
    harness.compile_bnfix()
    missing = harness.bnfix_available()
    if missing:
        log(f"bnfix is not importable ({missing}): its contenders are skipped")
    settings = suite.Settings(
        workdir=workdir, rounds=args.rounds, settle_s=None if args.no_sync else args.settle,
        idle_wait_s=args.wait_idle, bnfix_missing=missing, naive_large=args.naive_large,
        inproc=not args.no_inproc,
        anatomy_rounds=args.rounds if args.anatomy_rounds is None else args.anatomy_rounds,
        regen=args.regen, verify=args.verify, log=log)

    json_path = Path(args.json) if args.json else workdir / "results.json"
    keep = not (args.clean and workdir in json_path.resolve().parents)
    results: dict[str, object] = {}

    def save(final: bool = False) -> list[str]:
        """Write the raw numbers (and the tables beside them) after every part, so a run that
        dies late keeps what it measured."""
        verdicts = goals.evaluate(results)
        failures = ([f"bnfix not importable: {missing}"] if missing else []) + _failures(results)
        doc = {"machine": info, "argv": sys.argv, "complete": final, "settings": {
            "rounds": args.rounds, "pairs": args.pairs, "settle_s": settings.settle_s,
            "anatomy_rounds": settings.anatomy_rounds, "ci": args.ci},
            "bnfix_missing": missing, "results": results,
            "goals": [{"goal": v.goal.text, "limit": v.goal.limit, "unit": v.goal.unit,
                       "value": v.value, "status": v.status} for v in verdicts],
            "failures": failures}
        if keep:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(doc, indent=1, default=str))
            json_path.with_suffix(".md").write_text(tables.readme_tables(results, verdicts) + "\n")
        return failures

    results["floors"] = suite.run_floors(settings)
    log(tables.contenders_report(results["floors"], base="true"))  # type: ignore[arg-type]
    save()
    sized: dict[str, object] = {}
    results["sizes"] = sized
    for size in sizes:
        sized[size] = suite.run_size(size, settings)
        log(tables.size_report(size, sized[size]))  # type: ignore[arg-type]
        save()
    if args.pairs:
        results["pairs"] = suite.run_pairs(args.pairs, settings)
        log(tables.pairs_report(results["pairs"]))  # type: ignore[arg-type]

    failures = save(final=True)
    verdicts = goals.evaluate(results)
    log("\n---- README tables (Markdown) ----\n\n" + tables.readme_tables(results, verdicts)
        + "\n\n----")
    failed_goals = [v for v in verdicts if v.status == "FAIL"]
    log(f"\ngoals: {sum(v.status == 'PASS' for v in verdicts)} PASS, {len(failed_goals)} FAIL, "
        f"{sum(v.status == 'SKIP' for v in verdicts)} SKIP"
        + (" (not enforced with --ci)" if args.ci else ""))
    for f in failures:
        log(f"FAILED TO RUN: {f}")
    if keep:
        log(f"raw numbers: {json_path}; tables: {json_path.with_suffix('.md')}")
    if args.clean:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        return 1
    return 1 if failed_goals and not args.ci else 0


def _failures(results: dict[str, object]) -> list[str]:
    """Contenders and subcommands that failed to run (a skip for lack of memory is not one)."""
    found = []

    def scan(where: str, node: object) -> None:
        if not isinstance(node, dict):
            return
        for c in (node.get("contenders") or {}).values():
            err = c.get("error")
            if err and not err.startswith("skipped"):
                found.append(f"{where}: {c['label']}: {err}")
        for sub in ("inproc", "anatomy"):
            if isinstance(node.get(sub), dict) and "error" in node[sub]:
                found.append(f"{where}: {sub}: {node[sub]['error']}")
        if isinstance(node.get("anatomy"), dict) and node["anatomy"].get("byte_mismatches"):
            found.append(f"{where}: anatomy wrote wrong bytes: {node['anatomy']['byte_mismatches']}")

    scan("floors", results.get("floors"))
    for size, res in (results.get("sizes") or {}).items():  # type: ignore[attr-defined]
        scan(size, res)
    scan("pairs", results.get("pairs"))
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(HERE))  # the parts are siblings of this file, also when imported
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]))
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
