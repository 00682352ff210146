"""Batch-norm arithmetic: Darknet's denominators, Caffe's float32 one, and the variance map.

Everything here is pure numpy on arrays, no I/O, so the maths can be property-tested on its own.

Darknet normalises with ``D(var) = sqrt(var + inside) + outside`` (which pair depends on the
build, see ``PRESETS``); Caffe with ``sqrt(b1/s + eps)`` in float32.  bnfix stores
``b1' = s * (D(b1/s)**2 - eps)`` so the two agree, then checks the agreement by recomputing
Caffe's float32 arithmetic on the values actually stored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

F32 = np.float32


@dataclass(frozen=True)
class Formula:
    """A Darknet denominator ``sqrt(var + inside) + outside``."""

    inside: float
    outside: float
    preset: str | None = None

    def denominator(self, var: np.ndarray) -> np.ndarray:
        """D(var) in float64: the reference every error is measured against."""
        return np.sqrt(np.asarray(var, np.float64) + self.inside) + self.outside

    def inverse(self, den: np.ndarray) -> np.ndarray:
        """The variance whose D is ``den`` (float64); used to undo a patch."""
        root = np.asarray(den, np.float64) - self.outside
        return np.maximum(root * root - self.inside, 0.0)

    @property
    def expression(self) -> str:
        inner = f"var + {_num(self.inside)}" if self.inside else "var"
        return f"sqrt({inner})" + (f" + {_num(self.outside)}" if self.outside else "")

    def __str__(self) -> str:
        return f"{self.expression} ({self.preset})" if self.preset else self.expression


def _num(x: float) -> str:
    return repr(float(x))


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
    return float(F32(x))


def caffe_denominator(b1: np.ndarray, s: float, eps: float) -> np.ndarray:
    """``sqrt(b1 * (1/s) + eps)`` exactly as BVLC BatchNormLayer::Forward_cpu does, in float32.

    ``s == 0`` gives a zero factor (Caffe's guard), which zeroes the statistics.
    """
    s32 = F32(s)
    factor = F32(0.0) if s32 == 0 else F32(1.0) / s32
    var = np.asarray(b1, F32) * factor
    return np.sqrt(var + F32(eps))


def relative_error(den: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|den - ref| / ref in float64, per channel."""
    ref = np.asarray(reference, np.float64)
    return np.abs(np.asarray(den, np.float64) - ref) / ref


def denominator_error(stored: np.ndarray, s: float, eps: float, var: np.ndarray, formula: Formula) -> np.ndarray:
    """Per channel: Caffe's float32 denominator from stored blobs vs Darknet's for ``var``."""
    return relative_error(caffe_denominator(stored, s, eps), formula.denominator(var))


def patched_variance(var: np.ndarray, s: float, formula: Formula, eps: float) -> np.ndarray:
    """The float32 ``b1'`` whose Caffe denominator matches ``formula.denominator(var)``.

    ``var`` is the true (effective) variance, ``s`` the stored scale factor (not 0), ``eps`` the
    eps to be stored.  ``s * (D**2 - eps32)`` is computed in float64 with eps as the float32
    Caffe will hold, then rounded once to float32.  No search for a "luckier" neighbouring
    float32: that would gain a few 1e-8 but make the map many-to-one, and a revert could then no
    longer recover the original bits.
    """
    target = formula.denominator(var)
    return (float(s) * (target * target - f32(eps))).astype(F32)


def original_variance(stored: np.ndarray, s: float, formula: Formula, eps: float) -> np.ndarray:
    """Undo :func:`patched_variance`: the effective variance whose patch gives ``stored``."""
    den = np.sqrt(np.asarray(stored, np.float64) / float(s) + f32(eps))
    return formula.inverse(den)


def unpatched_variance(stored: np.ndarray, s: float, formula: Formula, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Revert :func:`patched_variance`: the float32 blob-1 values a patch turned into ``stored``.

    Returns ``(values, exact)``.  The float64 inverse is rounded to float32, then the nearest of
    its neighbours (up to two ulps) whose re-patch reproduces ``stored`` bit for bit is taken.
    ``exact`` is False where none does, or where several do: there the patch mapped more than
    one original to the same float32 (e.g. dead channels near var = 0), so the original is gone.
    """
    stored = np.asarray(stored, F32)
    s = float(s)
    guess = (original_variance(stored, s, formula, eps) * s).astype(F32)
    offsets = (0, 1, -1, 2, -2)
    candidates = []
    for k in offsets:
        c = guess
        for _ in range(abs(k)):
            c = np.nextafter(c, F32(np.inf if k > 0 else -np.inf))
        candidates.append(c)
    hits = [patched_variance(c.astype(np.float64) / s, s, formula, eps) == stored for c in candidates]
    chosen = guess.copy()
    found = np.zeros(stored.shape, bool)
    for c, hit in zip(candidates, hits):
        take = hit & ~found
        chosen[take] = c[take]
        found |= hit
    exact = found & (np.sum(hits, axis=0) == 1)
    return chosen, exact


def bad_channel(values: np.ndarray, *, allow_negative: bool) -> int | None:
    """Index of the first NaN/Inf (or negative) value, so an error can name the channel."""
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if not allow_negative:
        bad |= values < 0
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def max_relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """Largest |after - before| / |before|; inf when a changed value was exactly 0."""
    b = np.asarray(before, np.float64)
    a = np.asarray(after, np.float64)
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(b))
    return float(rel.max()) if rel.size else 0.0


def same_eps(a: float, b: float) -> bool:
    """Equal as Caffe sees them: both as float32."""
    return f32(a) == f32(b) or (math.isnan(a) and math.isnan(b))
