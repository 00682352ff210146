"""The ``bnfix`` command: arguments, their conflicts, and what every outcome exits with; the
run itself is ``batch.py``.

Exit codes: 0 success (also ``--dry-run``, and ``--check`` finding nothing to do); 1 only for
``--check`` finding work; 2 for any usage or input error (one ``bnfix: error: ...`` line each);
3 for a bug in bnfix (one line asking for a report; ``BNFIX_DEBUG=1`` adds the traceback);
128 + N when signal N (SIGINT, SIGTERM, SIGHUP) stopped it, with a line saying what is on disk.

This module imports almost nothing at start-up, so that a Ctrl-C while Python is still loading
bnfix is caught here too; rich is imported only when something is rendered.
"""

from __future__ import annotations

import sys

try:
    import os
    from typing import TYPE_CHECKING
except KeyboardInterrupt:  # Ctrl-C while the ``bnfix`` command starts: one line, no traceback
    sys.stderr.write("bnfix: error: interrupted while starting; nothing was changed\n")
    raise SystemExit(130) from None

if TYPE_CHECKING:
    import argparse

EXIT_OK, EXIT_WORK, EXIT_ERROR, EXIT_BUG = 0, 1, 2, 3  # batch.py computes the first three


def entry() -> None:
    """The ``bnfix`` command and ``python -m bnfix``: :func:`main`, then exit with its code.

    Unlike a call of ``main()``, signals are ignored from the moment the verdict is final
    (``commit.settle``), and a second signal cannot break the handling of the first: no late
    Ctrl-C prints a traceback or changes the exit status of a run that has finished.
    """
    raise SystemExit(main(exiting=True))


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run bnfix; never raises (every outcome is an exit code and at most a few lines).
    ``exiting``: the process ends after this (see :func:`entry`)."""
    try:
        from . import commit

        commit.install_signal_handlers(once=exiting)
        code = _main(argv, exiting)
        if exiting:
            commit.settle()
        return code
    except KeyboardInterrupt as exc:  # also SIGTERM/SIGHUP, turned into this by commit
        _settle(exiting)  # (done already if commit's handler raised it)
        return _interrupted(exc)
    except BrokenPipeError:  # stdout closed early (bnfix ... | head): as SIGPIPE would
        _settle(exiting)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        except OSError:
            pass
        return 128 + 13
    except Exception as exc:  # a bug: say so in one line, keep the traceback for BNFIX_DEBUG
        _settle(exiting)
        from . import commit

        interrupt = commit.interrupt_in(exc)
        if interrupt is not None:  # a Ctrl-C that Python wrapped (see interrupt_in)
            return _interrupted(interrupt)
        if os.environ.get("BNFIX_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"bnfix: internal error: {type(exc).__name__}: {exc} (a bug in bnfix: please report it to its "
              "maintainers with the command you ran; BNFIX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_BUG


def _settle(exiting: bool) -> None:
    if exiting:
        from . import commit

        commit.settle()


def _interrupted(exc: KeyboardInterrupt) -> int:
    from . import commit

    if isinstance(exc, commit.Interrupted):
        _error(str(exc))
        return exc.exit_code
    signum = getattr(exc, "signum", 2)
    _error("interrupted; nothing was written for the pair in progress")
    return 128 + signum


def _parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__, targets

    epilog = (
        "paths: a directory (every model pair under it), a .prototxt followed by its .caffemodel,\n"
        "or one file of a pair (its partner is found by the directory rules; see the README)\n\n"
        "targets (the runtime the model will run in; --strategy/--target-eps override):\n"
        + "".join(f"  {t.name:11} {t.strategy.value:5}  {t.runtime}\n" for t in targets.TARGETS.values())
        + "\nsources (the Darknet whose output the Caffe model must reproduce):\n"
        "  pjreddie-cpu  sqrt(var) + 1e-6    pjreddie/darknet CPU build (default)\n"
        "  pjreddie-gpu  sqrt(var + 1e-5)    pjreddie/darknet GPU build (since 2017-03)\n"
        "  alexeyab      sqrt(var + 1e-5)    AlexeyAB / hank-ai darknet today, CPU and GPU\n"
        "  opencv        sqrt(var + 1e-6)    OpenCV's readNetFromDarknet\n"
        "  \"sqrt(var+A)+B\"                    any other build, by hand\n\n"
        "exit codes: 0 success, 1 --check found work, 2 usage or input error, 3 bug in bnfix,\n"
        "128+N stopped by signal N\n"
    )
    _Formatter = _formatter_class()
    p = argparse.ArgumentParser(
        prog="bnfix", description="Fix BatchNorm eps/variance in Caffe models converted from Darknet, losslessly.",
        epilog=epilog, formatter_class=_Formatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="directories, PROTOTXT CAFFEMODEL pairs, or single files")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output-dir", metavar="DIR",
                       help="write outputs into DIR (mirroring the tree for directory arguments)")
    where.add_argument("--in-place", action="store_true", help="replace the inputs, keeping <file>.orig backups")
    where.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 if any pair needs work (one line per such pair), else 0")
    where.add_argument("--dry-run", action="store_true", help="print the full summary, write nothing")
    p.add_argument("--target", metavar="NAME", help=f"runtime the model will run in (default {targets.DEFAULT_TARGET})")
    p.add_argument("--strategy", metavar="NAME", help="eps (refit the variance) or scale (fold into the Scale layer)")
    p.add_argument("--source", metavar="NAME", help="Darknet formula to reproduce (default pjreddie-cpu)")
    p.add_argument("--target-eps", type=float, metavar="EPS", help="eps to store (eps strategy default 1e-6)")
    p.add_argument("--force", action="store_true",
                   help="patch layers that look already patched or not converted from Darknet")
    p.add_argument("--revert", action="store_true", help="undo an earlier bnfix patch, from its markers")
    p.add_argument("--find-partners", action="store_true",
                   help="every file argument stands alone: find its partner by the directory rules "
                        "(for hooks that pass the changed files)")
    p.add_argument("--darknet-weights", metavar="FILE",
                   help="the original .weights: report its writer and warn if --source does not fit it")
    p.add_argument("--darknet-cfg", metavar="FILE",
                   help="with --darknet-weights: compare every BatchNorm layer's statistics with Darknet's")
    p.add_argument("--no-sync", action="store_true",
                   help="do not fsync outputs before renaming them (faster; a power cut may leave them empty)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for another bnfix working on the same files (default 60; 0: fail at once)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="the per-layer table for every pair")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the summary (auto: only on a terminal, never under NO_COLOR)")
    p.add_argument("--version", action="version", version=f"bnfix {__version__}")
    return p


def _formatter_class() -> type[argparse.RawDescriptionHelpFormatter]:
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        """argparse's formatter, told the width: left to itself it imports shutil (2 ms of every
        run) to ask for the terminal size, whether any help is printed or not."""

        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: int | None = None) -> None:
            try:
                width = width or int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
                except (OSError, ValueError):
                    width = 80
            super().__init__(prog, indent_increment, max_help_position, max(width - 2, 11))

    return Formatter


def _conflict(args: argparse.Namespace) -> str | None:
    """Combinations argparse cannot express, as the one-line usage error to print."""
    if args.darknet_cfg and not args.darknet_weights:
        return "--darknet-cfg needs --darknet-weights"
    if args.revert:
        given = [flag for flag, value in (("--source", args.source), ("--target-eps", args.target_eps),
                                          ("--force", args.force), ("--target", args.target),
                                          ("--strategy", args.strategy), ("--check", args.check),
                                          ("--darknet-weights", args.darknet_weights)) if value not in (None, False)]
        if given:
            return (f"--revert cannot be combined with {', '.join(given)}: a revert restores what the "
                    "markers recorded")
    if args.wait < 0 or args.wait != args.wait:
        return "--wait must be a number of seconds >= 0"
    return None


def _main(argv: list[str] | None, exiting: bool) -> int:
    from . import commit, targets
    from .errors import BnfixError

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
        from .formulas import DEFAULT_SOURCE, parse_source

        try:
            source = parse_source(args.source or DEFAULT_SOURCE)
        except ValueError as exc:
            raise BnfixError(str(exc)) from None
        options = targets.resolve(args.target, args.strategy, args.target_eps, source, args.force)
        from .batch import Batch

        run = Batch(args, options)
        if args.darknet_weights and run.single is None:
            raise BnfixError("--darknet-weights/--darknet-cfg check one pair at a time")
        try:
            code = run.all()
            _settle(exiting)  # here, where a signal just before it still gets run.stopped's true message
            return code
        except (KeyboardInterrupt, RuntimeError) as exc:
            interrupt = commit.interrupt_in(exc)
            if interrupt is None:
                raise
            _error(run.stopped(interrupt))
            return getattr(interrupt, "exit_code", 128 + getattr(interrupt, "signum", 2))
    except BnfixError as exc:
        _error(str(exc))
        return EXIT_ERROR


def _error(message: str) -> None:
    print(f"bnfix: error: {message}", file=sys.stderr)
