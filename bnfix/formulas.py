"""Darknet's batch-norm denominators as data: presets, hand-written formulas, float32 rounding.

The formula itself is evaluated in ``semantics.darknet_denominator``; this module is what the
command line needs to parse ``--source`` and what a marker comment names.
"""

from __future__ import annotations

import math
import re
import struct
from collections import namedtuple


class Formula(namedtuple("Formula", "inside outside preset", defaults=(None,))):
    """A Darknet denominator ``D(var) = sqrt(var + inside) + outside``; ``preset`` names it.

    (Value classes here are named tuples, not dataclasses: ``import dataclasses`` alone costs
    20 ms, a tenth of a whole run on a YOLOv3.)
    """

    __slots__ = ()

    @property
    def expression(self) -> str:
        inner = f"var + {self.inside!r}" if self.inside else "var"
        return f"sqrt({inner})" + (f" + {self.outside!r}" if self.outside else "")

    def same_as(self, other: Formula) -> bool:
        return (self.inside, self.outside) == (other.inside, other.outside)

    def __str__(self) -> str:
        return f"{self.expression} ({self.preset})" if self.preset else self.expression


PRESETS: dict[str, Formula] = {
    # pjreddie/darknet src/blas.c normalize_cpu; AlexeyAB before 2020-02.
    "pjreddie-cpu": Formula(0.0, 1e-6, "pjreddie-cpu"),
    # pjreddie/darknet src/blas_kernels.cu normalize_kernel (since 2017-03-26).
    "pjreddie-gpu": Formula(1e-5, 0.0, "pjreddie-gpu"),
    # AlexeyAB and hank-ai today, CPU and GPU.
    "alexeyab": Formula(1e-5, 0.0, "alexeyab"),
    # opencv modules/dnn/src/darknet/darknet_io.cpp: matches no Darknet build.
    "opencv": Formula(1e-6, 0.0, "opencv"),
}
DEFAULT_SOURCE = "pjreddie-cpu"

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_EXPR = re.compile(
    rf"sqrt\(\s*var\s*(?:\+\s*(?P<a>{_NUM})\s*)?\)\s*(?:\+\s*(?P<b>{_NUM})\s*)?"
)


def parse_source(text: str) -> Formula:
    """A preset name, or a hand-written ``sqrt(var + A) + B`` (either term may be left out)."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    m = _EXPR.fullmatch(key.replace(" ", ""))
    if not m:
        names = ", ".join(PRESETS)
        raise ValueError(f"unknown source {text!r}: use one of {names} or 'sqrt(var+A)+B'")
    a, b = float(m["a"] or 0.0), float(m["b"] or 0.0)
    for preset in PRESETS.values():  # name a hand-written formula when it is a preset's
        if (preset.inside, preset.outside) == (a, b):
            return preset
    return Formula(a, b)


def f32(x: float) -> float:
    """The float32 value Caffe holds for a float field (``1e-6`` is 9.99999997e-07)."""
    if not math.isfinite(x) or abs(x) >= 3.4028235677973366e38:
        return x if not math.isfinite(x) else math.copysign(math.inf, x)
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def same_eps(a: float, b: float) -> bool:
    """Equal as Caffe sees them: both as float32."""
    return f32(a) == f32(b) or (math.isnan(a) and math.isnan(b))
