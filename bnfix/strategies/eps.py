"""The eps strategy (bnfix 1.0's fix, the default): set eps and refit the stored variance.

``var' = s * (D(var/s)^2 - eps)``, so that Caffe's ``sqrt(var'/s + eps)`` is Darknet's ``D``.
It changes only BatchNorm layers, so it needs no Scale layer; but it relies on every runtime
reading eps from the prototxt, and near-zero-variance channels store a negative variance.
"""

from __future__ import annotations

from .. import semantics as sem
from ..pairing import Group
from ..result import StrategyName
from . import Fit, Stats


class EpsStrategy:
    name = StrategyName.EPS
    changed = "variance"
    field = "var"

    def unusable(self, g: Group) -> str:
        return ""

    def fit(self, orig: Stats, fit: Fit) -> Stats:
        s_eff, k = fit.s_eff, fit.k
        var = orig.var if s_eff == 1 else [v / s_eff for v in orig.var]
        mean = orig.mean if k == 1 else sem.to_f32([m * k for m in orig.mean])
        return Stats(mean, sem.patched_variance(var, fit.s_new, fit.formula, fit.eps), fit.s_new, orig.gamma)

    def unfit(self, stored: Stats, fit: Fit) -> tuple[Stats, list[list[float]]]:
        var, exact = sem.variance_candidates(stored.var, fit.s_new, fit.formula, fit.eps, fit.s_orig)
        k = fit.k
        mean = stored.mean if k == 1 else sem.to_f32([m / k for m in stored.mean])
        return Stats(mean, var, fit.s_orig, stored.gamma), exact


EPS = EpsStrategy()
