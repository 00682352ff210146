"""The scale strategy: leave BatchNorm's eps and variance alone, fold the ratio into gamma.

``gamma' = gamma * sqrt(var/s + eps) / D(var/s)``, with the root being the float32 denominator
Caffe computes from the stored blobs, so BatchNorm followed by Scale multiplies each channel
by Darknet's ``gamma / D``.  It is exact on every channel (dead ones included), stores no
negative variance, and survives runtimes and scripts that clamp or hard-code eps, since eps
does not change.  It needs the Scale layer that alone consumes the BatchNorm's output
(``pairing.py``); a BatchNorm without one is corrected with the eps strategy instead.
"""

from __future__ import annotations

from .. import semantics as sem
from ..pairing import Group
from ..result import StrategyName
from . import Fit, Stats


class ScaleStrategy:
    name = StrategyName.SCALE
    changed = "gamma"
    field = "gamma"

    def unusable(self, g: Group) -> str:
        if g.scale is None:
            return f"no Scale layer to fold into: {g.no_scale}"
        if len(g.entries) != 1 or len(g.scale.entries) != 1:
            return "several caffemodel entries share its name or its Scale layer's"
        return g.scale.problem()

    def fit(self, orig: Stats, fit: Fit) -> Stats:
        assert orig.gamma is not None
        s_eff, k = fit.s_eff, fit.k
        target = sem.darknet_denominator([v / s_eff for v in orig.var], fit.formula)
        mean, var = orig.mean, orig.var
        if k != 1:
            mean, var = sem.to_f32([m * k for m in mean]), sem.to_f32([v * k for v in var])
        den = sem.caffe_denominator(var, fit.s_new, fit.eps)
        return Stats(mean, var, fit.s_new, sem.fold_gamma(orig.gamma, den, target))

    def unfit(self, stored: Stats, fit: Fit) -> tuple[Stats, list[list[float]]]:
        assert stored.gamma is not None
        k = fit.k
        mean, var = stored.mean, stored.var
        if k != 1:
            mean, var = sem.to_f32([m / k for m in mean]), sem.to_f32([v / k for v in var])
        target = sem.darknet_denominator([v / fit.s_eff for v in var], fit.formula)
        den = sem.caffe_denominator(stored.var, fit.s_new, fit.eps)
        gamma, exact = sem.gamma_candidates(stored.gamma, den, target)
        return Stats(mean, var, fit.s_orig, gamma), exact


SCALE = ScaleStrategy()
