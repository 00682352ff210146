"""The goals of issue 10 as data, and their evaluation against a bench run.

Every goal is one measured number that must stay at or below a limit, found in the run's
results by a path.  That keeps the table readable as the issue states it, and keeps the
evaluation one loop instead of one branch per goal.  A goal whose number was not measured
(a size that was not run, a contender that failed) is SKIP, never PASS.

All ratios are whole-process and like for like: ``bnfix --no-sync`` against ``cp`` (neither
fsyncs), and plain ``bnfix`` (which fsyncs its outputs and their directory) against ``cp`` followed
by ``sync`` of the copied files and their directory.  Each ratio is the median over the rounds
of the ratio within a round (see ``harness.paired_ratio``).
"""

from __future__ import annotations

from typing import NamedTuple

from generate import SIZES


class Goal(NamedTuple):
    text: str  # "{n}" is the number of small pairs in the run
    path: tuple[str, ...]  # where the number is in the results (see suite.py)
    limit: float
    unit: str  # "×", "ms" or "MiB"


class Verdict(NamedTuple):
    goal: Goal
    value: float | None
    status: str  # PASS | FAIL | SKIP


_SIZE_TEXT = {"30mb": "30 MB", "248mb": "248 MB", "1.9gb": "1.9 GB"}
_PLAIN_LIMIT = {"30mb": 4.0, "248mb": 2.0, "1.9gb": 1.5}
DURABLE_LIMIT = 1.5
PER_PAIR_MS = 10.0
RSS_MIB = 60.0

GOALS: list[Goal] = (
    [Goal(f"`bnfix --no-sync` / `cp`, {_SIZE_TEXT[s]}", ("sizes", s, "ratios", "plain"),
          _PLAIN_LIMIT[s], "×") for s in SIZES]
    + [Goal(f"durable `bnfix` / `cp && sync`, {_SIZE_TEXT[s]}", ("sizes", s, "ratios", "durable"),
            DURABLE_LIMIT, "×") for s in SIZES]
    + [Goal("durable `bnfix` / `cp && sync`, {n} small pairs in one call",
            ("pairs", "ratios", "durable"), DURABLE_LIMIT, "×"),
       Goal("per small pair, one `bnfix --no-sync` call over {n} pairs", ("pairs", "per_pair_ms", "bnfix"),
            PER_PAIR_MS, "ms"),
       Goal("peak RSS, {n} small pairs in one call", ("pairs", "rss_mib"), RSS_MIB, "MiB")]
    + [Goal(f"peak RSS, one model, {_SIZE_TEXT[s]}", ("sizes", s, "rss_mib"), RSS_MIB, "MiB")
       for s in SIZES]
)


def lookup(results: dict[str, object], path: tuple[str, ...]) -> float | None:
    node: object = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) else None


def evaluate(results: dict[str, object]) -> list[Verdict]:
    verdicts = []
    for goal in GOALS:
        value = lookup(results, goal.path)
        status = "SKIP" if value is None else ("PASS" if value <= goal.limit else "FAIL")
        verdicts.append(Verdict(goal, value, status))
    return verdicts
