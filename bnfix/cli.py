"""The ``bnfix`` command: arguments, output paths, exit codes; the work happens in ``patch``.

Exit codes: 0 success (also ``--dry-run``, and ``--check`` finding nothing to do), 1 only for
``--check`` finding work, 2 for any usage or input error.  Every ``BnfixError`` becomes one
``bnfix: error: ...`` line on stderr.  rich is imported only when something is rendered, so
``--quiet`` runs in a pipeline pay nothing for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__, atomic
from . import formulas
from .errors import BnfixError
from .patch import Options, Result, patch
from .revert import revert

EXIT_OK, EXIT_WORK, EXIT_ERROR = 0, 1, 2

_EPILOG = """\
sources (the Darknet whose output the Caffe model must reproduce):
  pjreddie-cpu  sqrt(var) + 1e-6    pjreddie/darknet CPU build (default)
  pjreddie-gpu  sqrt(var + 1e-5)    pjreddie/darknet GPU build (since 2017-03)
  alexeyab      sqrt(var + 1e-5)    AlexeyAB / hank-ai darknet today, CPU and GPU
  opencv        sqrt(var + 1e-6)    OpenCV's readNetFromDarknet
  "sqrt(var+A)+B"                    any other build, by hand

exit codes: 0 success, 1 --check found layers to patch, 2 usage or input error
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnfix",
        description="Fix BatchNorm eps/variance in Caffe models converted from Darknet, losslessly.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="PROTOTXT CAFFEMODEL",
                   help="one or more pairs: a .prototxt followed by its .caffemodel")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output-dir", type=Path, metavar="DIR",
                       help="write both outputs into DIR under the inputs' own names (created if missing)")
    where.add_argument("--in-place", action="store_true",
                       help="replace the inputs, keeping <file>.orig backups")
    where.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 if any BatchNorm layer needs patching, else 0")
    where.add_argument("--dry-run", action="store_true", help="print the full summary, write nothing")
    p.add_argument("--source", default=formulas.DEFAULT_SOURCE, metavar="NAME",
                   help="Darknet formula to reproduce: pjreddie-cpu (default), pjreddie-gpu, alexeyab, "
                        "opencv, or 'sqrt(var+A)+B'")
    p.add_argument("--target-eps", type=float, default=1e-6, metavar="EPS",
                   help="eps to store in the model (default 1e-6; NVCaffe and cuDNN<7.6.5 need >= 1e-5)")
    p.add_argument("--revert", action="store_true",
                   help="undo an earlier bnfix patch (original variance, eps and use_global_stats)")
    p.add_argument("--force", action="store_true",
                   help="patch layers that look already patched or not converted from Darknet")
    p.add_argument("--darknet-weights", type=Path, metavar="FILE",
                   help="the original .weights: report its writer and warn if --source does not fit it")
    p.add_argument("--darknet-cfg", type=Path, metavar="FILE",
                   help="with --darknet-weights: compare every BatchNorm layer's statistics with Darknet's")
    p.add_argument("--no-sync", action="store_true",
                   help="do not fsync outputs before renaming them (faster; a power cut may leave them empty)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the summary (auto: only on a terminal, never under NO_COLOR)")
    p.add_argument("--version", action="version", version=f"bnfix {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version 0
        return int(exc.code or 0)
    conflict = _conflict(args)
    if conflict:
        parser.print_usage(sys.stderr)
        _error(conflict)
        return EXIT_ERROR
    try:
        options = Options(formulas.parse_source(args.source), args.target_eps, args.force)
    except (ValueError, BnfixError) as exc:
        print(f"bnfix: error: {exc}", file=sys.stderr)
        return EXIT_ERROR

    console = None if args.quiet else _console(args)
    results: list[Result] = []
    errors: list[dict] = []
    code = EXIT_OK
    pairs = list(zip(args.files[::2], args.files[1::2]))
    if args.json and args.json != "-":
        clash = next((f for f in args.files if _same(Path(args.json), Path(f))), None)
        if clash:
            _error(f"{args.json}: the JSON report would overwrite the input {clash}")
            return EXIT_ERROR
    written: set[Path] = set()
    for pp, mp in pairs:
        try:
            result = _run_pair(Path(pp), Path(mp), options, args, console, written)
        except KeyboardInterrupt:  # temp files are already gone (atomic.write_all cleans up)
            _error("interrupted; no output was written for the pair in progress")
            return 130
        except BnfixError as exc:
            _error(str(exc))
            errors.append({"prototxt": pp, "caffemodel": mp, "error": str(exc)})
            code = EXIT_ERROR
            continue
        except OSError as exc:
            msg = f"{exc.filename or mp}: {exc.strerror or exc}"
            _error(msg)
            errors.append({"prototxt": pp, "caffemodel": mp, "error": msg})
            code = EXIT_ERROR
            continue
        results.append(result)
        if args.check and result.needs_work:
            code = max(code, EXIT_WORK)
        if console is not None:
            from . import report

            console.print(report.table(result))
            console.print()
    if console is not None and len(pairs) > 1:
        from . import report

        t = report.totals(results)
        console.print(f"[bold]total:[/] {len(results)} of {len(pairs)} pairs done, {t['patched']} layers patched, "
                      f"{t['skipped']} skipped, {t['up_to_date']} up to date, {len(errors)} failed")
    if args.json:
        code = max(code, _write_json(args.json, results, errors))
    return code


def _conflict(args) -> str | None:
    """Combinations argparse cannot express, as the one-line usage error to print."""
    if len(args.files) % 2:
        return "files come in pairs: PROTOTXT CAFFEMODEL [PROTOTXT CAFFEMODEL ...]"
    if args.darknet_cfg and not args.darknet_weights:
        return "--darknet-cfg needs --darknet-weights"
    if args.darknet_weights and len(args.files) != 2:
        return "--darknet-weights/--darknet-cfg check one pair at a time"
    if args.revert and (args.check or args.force):
        return "--revert cannot be combined with --check or --force"
    return None


def _run_pair(pp: Path, mp: Path, options: Options, args, console, written: set[Path]) -> Result:
    outs = None
    if not (args.check or args.dry_run):
        outs = output_paths(pp, mp, args.output_dir, args.in_place)
        for out in outs:
            if out.resolve() in written:
                raise BnfixError(f"{out}: already written by an earlier pair of this run")
    check = None
    if args.darknet_weights:
        from .crosscheck import crosscheck

        check = crosscheck(pp, mp, args.darknet_weights, args.darknet_cfg, options.source)
    result = revert(pp, mp) if args.revert else patch(pp, mp, options)
    result.darknet = check
    if outs is None:
        result.compute()  # now: bad statistics are errors in --check and --dry-run too
    else:
        result.save(*outs, backup=args.in_place, sync=not args.no_sync,
                    progress=_progress(console, result.caffemodel))
        written.update(out.resolve() for out in outs)
    return result


def output_paths(pp: Path, mp: Path, out_dir: Path | None, in_place: bool) -> tuple[Path, Path]:
    """Where the pair goes: beside the inputs as ``<stem>.bnfix<ext>``, into DIR, or in place."""
    if in_place:
        return pp, mp
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise BnfixError(f"{out_dir}: exists and is not a directory")
        outs = (out_dir / pp.name, out_dir / mp.name)
    else:
        outs = tuple(p.with_name(f"{p.stem}.bnfix{p.suffix}") for p in (pp, mp))
    for out in outs:
        for src in (pp, mp):
            if _same(out, src):
                raise BnfixError(f"{out}: output path is an input file (use --in-place to replace inputs)")
    if _same(outs[0], outs[1]):
        raise BnfixError(f"{outs[0]}: both outputs would get the same path")
    return outs


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _error(message: str) -> None:
    print(f"bnfix: error: {message}", file=sys.stderr)


def _console(args):
    from rich.console import Console

    stream = sys.stderr if args.json == "-" else sys.stdout
    color = {"always": True, "never": False}.get(args.color)
    no_color = color is False or (color is None and bool(os.environ.get("NO_COLOR")))
    # NO_COLOR means no ANSI styling at all (rich's own no_color would keep bold and dim).
    console = Console(file=stream, force_terminal=color, no_color=no_color, highlight=False,
                      soft_wrap=False, **({"color_system": None} if no_color else {}))
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160
    return console


def _progress(console, path: Path):
    """A progress callback that shows a bar only on a terminal once the copy has taken > 1 s."""
    if console is None or not console.is_terminal:
        return None
    total = path.stat().st_size
    start = time.monotonic()
    state: dict = {}

    def update(done: int) -> None:
        if "bar" not in state:
            if time.monotonic() - start < 1.0:
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), console=console, transient=True)
            state["bar"], state["task"] = bar, bar.add_task("copy", total=total)
            bar.start()
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state["bar"].stop()

    return update


def _write_json(target: str, results: list[Result], errors: list[dict]) -> int:
    import json

    from . import report

    text = json.dumps(report.to_json(results, errors), indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        atomic.write_all([(Path(target), text.encode())])
    except BnfixError as exc:
        _error(str(exc))
        return EXIT_ERROR
    return EXIT_OK
