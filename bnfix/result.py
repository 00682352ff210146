"""The records a run produces: its options, a status per layer, one report per BatchNorm layer.

All of them are immutable values.  They are what the renderers (``report.py``) and API users
read; nothing here does I/O or arithmetic.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

from .errors import UsageError
from .formulas import DEFAULT_SOURCE, PRESETS, Formula

CAFFE_DEFAULT_EPS = 1e-5
DEFAULT_EPS = 1e-6  # what the eps strategy stores unless told otherwise (Darknet's own constant)


class Status(str, Enum):
    """What happened to one BatchNorm layer (the JSON ``status`` value)."""

    PATCHED = "patched"
    SKIPPED = "skipped"
    UP_TO_DATE = "up to date"
    REVERTED = "reverted"


class StrategyName(str, Enum):
    """How a layer is corrected (``--strategy``); each has a module in ``bnfix/strategies/``."""

    EPS = "eps"  # set eps, refit the stored variance (bnfix 1.0's fix, the default)
    SCALE = "scale"  # keep BatchNorm as it is, fold the ratio into the following Scale's gamma


class Mode(str, Enum):
    PATCH = "patch"
    REVERT = "revert"


class Options(NamedTuple):
    """What the patched model must reproduce and how to get there.

    ``target_eps`` None means the strategy's own choice (eps: 1e-6; scale: keep the layer's
    eps).  ``eps_floor`` raises any eps below it (runtimes that clamp, e.g. NVCaffe).
    ``min_scale_factor`` > 0 rescales a layer whose scale factor is below it to 1024 (a power
    of two, so the statistics scale exactly), for runtimes that divide by ``s + 1e-5``.
    ``target`` and ``choices`` only describe where the other fields came from.
    """

    source: Formula = PRESETS[DEFAULT_SOURCE]
    strategy: StrategyName = StrategyName.EPS
    target_eps: float | None = None
    eps_floor: float = 0.0
    min_scale_factor: float = 0.0
    force: bool = False
    target: str = "caffe"
    choices: tuple[str, ...] = ()

    def checked(self) -> Options:
        """Self, after refusing an eps that Caffe cannot use (NaN, infinite, negative)."""
        for what, value in (("target eps", self.target_eps), ("eps floor", self.eps_floor)):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{what} must be a finite number >= 0, not {value!r}")
        return self

    def eps_for(self, strategy: StrategyName, current: float) -> float:
        """The eps a layer gets: the option, else the strategy's default, raised to the floor."""
        if self.target_eps is not None:
            eps = self.target_eps
        else:
            eps = DEFAULT_EPS if strategy is StrategyName.EPS else current
        return max(eps, self.eps_floor)


class LayerReport(NamedTuple):
    """One BatchNorm layer's row of the diff summary (every number from the written bytes).

    ``err_before``/``err_after`` are the largest relative error, over the channels, of the
    effective per-channel denominator Caffe computes in float32 (BatchNorm, then Scale)
    against the Darknet formula; None when unknown (a layer patched by an earlier run, whose
    original statistics are gone, or one whose statistics bnfix cannot read).
    ``max_rel_change`` is the largest relative change of the statistic the strategy rewrote
    (``changed``: "variance" or "gamma"); None when a changed value was exactly 0.
    """

    name: str
    channels: int
    status: Status
    strategy: StrategyName | None = None
    changes: tuple[str, ...] = ()
    reason: str = ""
    warning: bool = False
    eps_before: float = CAFFE_DEFAULT_EPS
    eps_after: float = CAFFE_DEFAULT_EPS
    changed: str = ""
    max_rel_change: float | None = 0.0
    negative_channels: int = 0
    err_before: float | None = None
    err_after: float | None = None
    worst_channel: int | None = None
    scale_layer: str | None = None
