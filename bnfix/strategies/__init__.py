"""How a layer gets corrected: one module per strategy, behind one small interface.

A strategy turns a layer group's original statistics into the ones to store (``fit``), says
whether it can correct a group at all (``unusable``), and inverts its own fit for revert and
re-patch (``unfit``).  Everything else (deciding whether a layer needs work, the scale-factor
fixes, eps and use_global_stats, the markers, encoding, verifying, reporting) is shared and
lives in ``plan.py``.  A new strategy is one module here, one ``StrategyName`` value (its
marker tag) and one entry in :func:`get`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ..formulas import Formula
from ..pairing import Group
from ..result import StrategyName
from ..semantics import Array


class Stats(NamedTuple):
    """A layer's statistics as stored: BatchNorm mean (blob 0), variance (blob 1), scale factor
    (blob 2) and, with a Scale companion, its gamma (None without one)."""

    mean: Array
    var: Array
    s: float
    gamma: Array | None


class Fit(NamedTuple):
    """What a fit reproduces and stores: Darknet's formula, the eps to store, the scale factor
    the originals were stored with (0 means 1: the converter bug) and the one to store."""

    formula: Formula
    eps: float
    s_orig: float
    s_new: float

    @property
    def s_eff(self) -> float:
        return self.s_orig or 1.0

    @property
    def k(self) -> float:
        """The power of two the statistics are multiplied by when the scale factor changes."""
        return self.s_new / self.s_eff


class Strategy(Protocol):
    name: StrategyName
    changed: str  # the statistic it rewrites, for the report ("variance", "gamma")
    field: str  # ... as a Stats field ("var", "gamma")

    def unusable(self, g: Group) -> str:
        """Why this strategy cannot correct ``g`` ("" when it can)."""

    def fit(self, orig: Stats, fit: Fit) -> Stats:
        """The statistics to store for ``orig`` (stored as converted, scale factor ``fit.s_orig``)."""

    def unfit(self, stored: Stats, fit: Fit) -> tuple[Stats, list[list[float]]]:
        """The original statistics a ``fit`` turned into ``stored``, and per channel of the
        rewritten statistic the float32 originals that fit back to it bit for bit (one where
        the fit is one-to-one; float32 may map several originals to one value)."""


def get(name: StrategyName) -> Strategy:
    from . import eps, scale

    strategies: dict[StrategyName, Strategy] = {StrategyName.EPS: eps.EPS, StrategyName.SCALE: scale.SCALE}
    return strategies[name]
