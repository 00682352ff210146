"""Batch-norm arithmetic: Caffe's float32 denominator, the variance map and its inverse.

Pure functions on sequences of floats, no I/O, so the maths can be property-tested on its own.
Darknet normalises with ``D(var) = sqrt(var + inside) + outside`` (which pair depends on the
build: ``formulas.PRESETS``); Caffe with ``sqrt(b1/s + eps)`` in float32.  bnfix stores
``b1' = s * (D(b1/s)**2 - eps)`` so the two agree, then checks the agreement by recomputing
Caffe's float32 arithmetic on the values actually stored.

Why plain Python and not numpy: a run touches a few thousand channels, and ``import numpy``
alone costs more than copying a 248 MB caffemodel.  Float32 arithmetic is emulated exactly:
each operation is done in float64 on float32 inputs and rounded once to float32
(``array('f')``), which for +, -, *, / and sqrt gives the correctly rounded float32 result
because 53 >= 2 * 24 + 2 (Figueroa, "When is double rounding innocuous?", 1995).  The tests
check this against numpy's float32 bit for bit.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .formulas import DEFAULT_SOURCE, PRESETS, Formula, f32, parse_source, same_eps  # noqa: F401 (re-exported)

Floats = Sequence[float]
if TYPE_CHECKING:
    Array = array[float]  # array('f') or array('d')
else:
    Array = array


def to_f32(values: Iterable[float]) -> Array:
    """Round each value to float32 (as Caffe stores it)."""
    return array("f", values)


def caffe_denominator(b1: Floats, s: float, eps: float) -> Array:
    """``sqrt(b1 * (1/s) + eps)`` exactly as BVLC BatchNormLayer::Forward_cpu does, in float32.

    ``s == 0`` gives a zero factor (Caffe's guard), which zeroes the statistics.
    """
    s32 = f32(s)
    factor = 0.0 if s32 == 0 else f32(1.0 / s32)
    eps32 = f32(eps)
    var = to_f32([b * factor for b in to_f32(b1)])
    total = to_f32([v + eps32 for v in var])
    return to_f32(_sqrts(total))


def _sqrts(values: Floats) -> Iterable[float]:
    """sqrt of each value, NaN for a negative one (as C and numpy give); one C loop when all are >= 0."""
    if not len(values) or min(values) >= 0:
        return map(math.sqrt, values)
    return (math.sqrt(x) if x >= 0 else math.nan for x in values)


def darknet_denominator(var: Floats, formula: Formula) -> list[float]:
    """D(var) in float64: the reference every error is measured against."""
    a, b = formula.inside, formula.outside
    roots = _sqrts([v + a for v in var] if a else var)
    return [r + b for r in roots] if b else list(roots)


def relative_error(den: Floats, reference: Floats) -> list[float]:
    """|den - ref| / ref per channel (inf where the reference is 0, NaN where undefined)."""
    try:
        return [abs(d - r) / r for d, r in zip(den, reference)]
    except ZeroDivisionError:  # a zero reference (only with a formula that allows D = 0)
        return [abs(d - r) / r if r else (0.0 if d == r else math.inf) for d, r in zip(den, reference)]


def denominator_error(stored: Floats, s: float, eps: float, var: Floats, formula: Formula) -> list[float]:
    """Per channel: Caffe's float32 denominator from stored blobs vs Darknet's for ``var``."""
    return relative_error(caffe_denominator(stored, s, eps), darknet_denominator(var, formula))


def stored_variance(target: Floats, s: float, eps: float) -> Array:
    """The float32 ``b1'`` for which Caffe's denominator is ``target`` (see patched_variance)."""
    eps32, s = f32(eps), float(s)
    return to_f32([s * (d * d - eps32) for d in target])


def patched_variance(var: Floats, s: float, formula: Formula, eps: float) -> Array:
    """The float32 ``b1'`` whose Caffe denominator matches ``D(var)``.

    ``var`` is the true (effective) variance, ``s`` the stored scale factor (not 0), ``eps`` the
    eps to be stored.  ``s * (D**2 - eps32)`` is computed in float64 with eps as the float32
    Caffe will hold, then rounded once to float32.  No search for a "luckier" neighbouring
    float32: that would gain a few 1e-8 but make the map many-to-one, and a revert could then no
    longer recover the original bits.
    """
    a, b = formula.inside, formula.outside
    if not len(var) or min(var) + a < 0:  # NaN channels: the general path says so
        return stored_variance(darknet_denominator(var, formula), s, eps)
    eps32, s, sqrt = f32(eps), float(s), math.sqrt
    # darknet_denominator and stored_variance in one pass (the same operations, bit for bit).
    return to_f32([s * ((d := sqrt(v + a) + b) * d - eps32) for v in var])


def original_variance(stored: Floats, s: float, formula: Formula, eps: float) -> list[float]:
    """Undo :func:`patched_variance` in float64: the effective variance whose patch gives ``stored``."""
    eps32, s = f32(eps), float(s)
    a, b = formula.inside, formula.outside
    out = []
    for v in stored:
        den2 = v / s + eps32
        root = (math.sqrt(den2) if den2 >= 0 else 0.0) - b
        out.append(max(root * root - a, 0.0))
    return out


def f32_step(x: float, k: int) -> float:
    """The float32 ``k`` representable steps above (k > 0) or below ``x`` (a float32 value)."""
    for _ in range(abs(k)):
        if x != x or math.isinf(x):
            return x
        bits = struct.unpack("<i", struct.pack("<f", x))[0]
        up = k > 0
        if x == 0:
            bits = 1 if up else -2147483647  # the smallest subnormal of the right sign
        elif (x > 0) == up:
            bits += 1
        else:
            bits -= 1
        x = struct.unpack("<f", struct.pack("<i", bits))[0]
    return x


def _inverse(guesses: Floats, stored: Floats, forward: Callable[[list[float], int], Floats]
             ) -> tuple[array[float], list[list[float]]]:
    """Per channel, the float32 values within two steps of ``guesses`` (a float64 inverse,
    rounded) that ``forward`` maps to ``stored`` bit for bit; the nearest is the value, all of
    them the candidates (one: exact; several: the map was many-to-one there; none: lost)."""
    values, hits_all = array("f"), []
    for i, (g, want) in enumerate(zip(guesses, stored)):
        candidates = [f32_step(g, k) for k in (0, 1, -1, 2, -2)]
        hits = [c for c, r in zip(candidates, forward(candidates, i)) if r == want]
        values.append(hits[0] if hits else g)
        hits_all.append(hits)
    return values, hits_all


def variance_candidates(stored: Floats, s: float, formula: Formula, eps: float,
                        s_orig: float | None = None) -> tuple[array[float], list[list[float]]]:
    """Revert :func:`patched_variance`: the float32 blob-1 values a patch turned into ``stored``
    (see :func:`_inverse`).  ``s`` is the scale factor stored with ``stored``; ``s_orig`` the one
    the originals were stored with when the patch changed it (by a power of two)."""
    stored = to_f32(stored)
    s = float(s)
    s_eff = s if s_orig is None else (float(s_orig) or 1.0)
    guesses = to_f32([v * s_eff for v in original_variance(stored, s, formula, eps)])

    def forward(candidates: list[float], _: int) -> Floats:
        return patched_variance([c / s_eff for c in candidates], s, formula, eps)

    return _inverse(guesses, stored, forward)


def unpatched_variance(stored: Floats, s: float, formula: Formula, eps: float,
                       s_orig: float | None = None) -> tuple[array[float], list[bool]]:
    """:func:`variance_candidates`, with ``exact`` per channel: False where none or several
    originals re-patch to the stored value (dead channels near var = 0), so it is gone."""
    values, hits = variance_candidates(stored, s, formula, eps, s_orig)
    return values, [len(h) == 1 for h in hits]


def fold_gamma(gamma: Floats, den: Floats, target: Floats) -> array[float]:
    """The float32 gamma' = gamma * den / D for the Scale strategy (float64, rounded once).

    ``den`` is the float32 denominator Caffe computes from the stored BatchNorm blobs, so
    ``gamma' / den`` equals ``gamma / D``, Darknet's per-channel multiplier, to float32
    rounding; a zero D (only a hand-written formula allows it) leaves gamma as it is.
    """
    return to_f32([g * d / t if t else g for g, d, t in zip(gamma, den, target)])


def gamma_candidates(folded: Floats, den: Floats, target: Floats) -> tuple[array[float], list[list[float]]]:
    """Revert :func:`fold_gamma` (see :func:`_inverse`)."""
    folded = to_f32(folded)
    guesses = to_f32([f * t / d if d and t else f for f, d, t in zip(folded, den, target)])

    def forward(candidates: list[float], i: int) -> Floats:
        return fold_gamma(candidates, [den[i]] * len(candidates), [target[i]] * len(candidates))

    return _inverse(guesses, folded, forward)


def effective_error(den: Floats, gamma: Floats | None, gamma_ref: Floats | None, target: Floats) -> list[float]:
    """Per channel: how far Caffe's BatchNorm + Scale multiplier ``gamma / den`` is from
    Darknet's ``gamma_ref / D``, as the relative error of the effective denominator
    ``den * gamma_ref / gamma`` against ``D`` (exactly the denominator error when gamma is
    untouched).  A zero gamma counts as exact when the reference is zero too."""
    if gamma is None or gamma_ref is None or gamma == gamma_ref:
        return relative_error(den, target)
    eff = [d * r / g if g else (0.0 if r == 0 else math.inf) for d, g, r in zip(den, gamma, gamma_ref)]
    out = relative_error(eff, target)
    return [0.0 if g == 0 and r == 0 else e for e, g, r in zip(out, gamma, gamma_ref)]


def bad_channel(values: Floats, *, allow_negative: bool) -> int | None:
    """Index of the first NaN/Inf (or negative) value, so an error can name the channel."""
    if all(map(math.isfinite, values)) and (allow_negative or not len(values) or min(values) >= 0):
        return None
    for i, v in enumerate(values):
        if not math.isfinite(v) or (v < 0 and not allow_negative):
            return i
    return None


def max_relative_change(before: Floats, after: Floats) -> float:
    """Largest |after - before| / |before|; inf when a changed value was exactly 0."""
    return max((abs(a - b) / abs(b) if b else math.inf for b, a in zip(before, after) if a != b), default=0.0)


def worst(err: Floats) -> tuple[float | None, int]:
    """The largest error and its channel; None when the statistics make it undefined (NaN)."""
    if not len(err):
        return 0.0, 0
    nan = next((i for i, e in enumerate(err) if e != e), None)
    if nan is not None:
        return None, nan
    value = max(err)
    return (value if math.isfinite(value) else None), err.index(value)
