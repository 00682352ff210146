"""Check a conversion against its Darknet originals: who wrote the weights, and did the converter
copy every layer's statistics faithfully?

The ``.weights`` header names its writer (pjreddie writes 0.2.0, AlexeyAB and hank-ai 0.2.5),
which bounds the formula the model was validated with; a ``--source`` outside that bound is
warned about, never silently switched.  With the ``.cfg`` the Darknet BN layers are read in
order and mapped to the Caffe BatchNorm layers in prototxt order, cross-checked by channel
count, and the caffemodel's effective statistics (``blob/s``) are compared with Darknet's rolling
mean and variance.  A layer bnfix already patched is compared through the variance its marker
lets us recover.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import caffemodel, darknet, pairing, prototxt
from . import semantics as sem
from .errors import BnfixError
from .formulas import DEFAULT_SOURCE, PRESETS, Formula
from .marker import Marker
from .plan import layout_problem, stats_of
from .strategies import Stats

EXACT, ROUNDING, RECOVERED, MISMATCH, OUT_OF_ORDER, CHANNELS, MISSING = (
    "exact", "match (float32 rounding of blob/s)", "match (recovered from the bnfix patch)",
    "mismatch", "out of order", "channel count differs", "missing")
_OK = (EXACT, ROUNDING, RECOVERED)

# Formulas (inside, outside) each writer's Darknet builds have used (BN-SEMANTICS.md §1).
_FITS = {
    "pjreddie": ((0.0, 1e-6), (1e-5, 0.0)),  # CPU, GPU
    "AlexeyAB/hank-ai": ((1e-5, 0.0),),  # today; pre-2020 builds used sqrt(var)+1e-6
}


class LayerCheck(NamedTuple):
    caffe: str
    darknet_index: int | None  # Darknet layer number (cfg section order), None if unmatched
    darknet_line: int
    channels: int
    status: str
    max_abs_mean: float | None = None  # |caffe - darknet|, effective statistics
    max_rel_var: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in _OK


class CrossCheck(NamedTuple):
    weights: Path
    cfg: Path | None
    header: darknet.WeightsHeader
    source_warning: str
    layers: tuple[LayerCheck, ...] = ()

    @property
    def faults(self) -> int:
        return sum(not l.ok for l in self.layers)


def source_warning(header: darknet.WeightsHeader, source: Formula) -> str:
    """A warning when the chosen formula is not one the weights' writer has used, else ""."""
    fits = _FITS.get(header.writer)
    if fits is None or (source.inside, source.outside) in fits:
        return ""
    if header.writer == "pjreddie":
        return (f"{header.version} weights were written by pjreddie's Darknet, whose builds use "
                f"sqrt(var) + 1e-06 (CPU) or sqrt(var + 1e-05) (GPU): --source pjreddie-cpu or pjreddie-gpu fits, "
                f"not {source.expression}")
    return (f"{header.version} weights were written by AlexeyAB/hank-ai Darknet, which today uses "
            f"sqrt(var + 1e-05): --source alexeyab fits, not {source.expression} "
            "(which matches only AlexeyAB builds before 2020-02)")


def crosscheck(prototxt_path: str | Path, caffemodel_path: str | Path, weights_path: str | Path,
               cfg_path: str | Path | None = None, source: Formula = PRESETS[DEFAULT_SOURCE]) -> CrossCheck:
    """Read the Darknet originals and compare (no file is written)."""
    weights = Path(weights_path)
    if cfg_path is None:
        header = darknet.read_weights_header(weights)
        return CrossCheck(weights, None, header, source_warning(header, source))
    header, dn_layers = darknet.read_bn_layers(cfg_path, weights)
    doc = prototxt.read(prototxt_path)
    with caffemodel.Model(caffemodel_path) as model:
        groups, _ = pairing.pair(doc, model)
        checks = _compare(groups, dn_layers)
    return CrossCheck(weights, Path(cfg_path), header, source_warning(header, source), tuple(checks))


def _compare(groups: list[pairing.Group], dn_layers: list[darknet.DarknetBN]) -> list[LayerCheck]:
    out = []
    for i, g in enumerate(groups):
        problem = layout_problem(g.entries[0])
        if problem:
            raise BnfixError(f"layer {g.name!r}: {problem}")
        st = stats_of(g.entries[0], None)
        channels = len(st.var)
        if i >= len(dn_layers):
            out.append(LayerCheck(g.name, None, 0, channels, MISSING,
                                  note=f"the cfg has only {len(dn_layers)} batch-normalised layers"))
            continue
        dn = dn_layers[i]
        if dn.mean.size != channels:
            out.append(LayerCheck(g.name, dn.index, dn.line, channels, CHANNELS,
                                  note=f"Darknet layer {dn.index} has {dn.mean.size} channels"))
            continue
        status, dm, dv = _match(st, g.marker, dn)
        note = ""
        if status == MISMATCH:
            other = next((d for d in dn_layers if d is not dn and d.mean.size == channels
                          and _match(st, g.marker, d)[0] in _OK), None)
            if other is not None:
                status, note = OUT_OF_ORDER, f"its statistics are Darknet layer {other.index}'s (cfg line {other.line})"
        if st.s == 0:
            note = "; ".join(filter(None, [note, "scale factor s = 0: Caffe ignores these statistics "
                                                 "(bnfix sets s = 1 when it patches)"]))
            if status in _OK:
                status = "scale factor 0"
        out.append(LayerCheck(g.name, dn.index, dn.line, channels, status, dm, dv, note))
    for dn in dn_layers[len(groups):]:
        out.append(LayerCheck("", dn.index, dn.line, dn.mean.size, MISSING,
                              note="Darknet BN layer with no Caffe BatchNorm layer"))
    return out


def _match(st: Stats, marker: Marker | None, dn: darknet.DarknetBN) -> tuple[str, float, float]:
    """How the Caffe layer's effective statistics compare with one Darknet layer's."""
    s = st.s if st.s not in (0.0, 1.0) else 1.0
    var: sem.Floats = st.var
    if marker is not None and marker.strategy.value == "eps":
        var, _ = sem.unpatched_variance(st.var, 1.0 if st.s == 0 else st.s, marker.formula, marker.eps)
    mean_eff = np.asarray(st.mean, np.float64) / s
    var_eff = np.asarray(var, np.float64) / s
    dm = float(np.max(np.abs(mean_eff - dn.mean), initial=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(var_eff == dn.variance, 0.0, np.abs(var_eff - dn.variance) / np.abs(dn.variance))
    dv = float(np.max(rel, initial=0))
    bits_equal = (np.array_equal(np.asarray(st.mean, np.float32), dn.mean)
                  and np.array_equal(np.asarray(var, np.float32), dn.variance))
    if s == 1.0 and bits_equal:
        return (RECOVERED if marker is not None else EXACT), dm, dv
    # With s != 1 the file holds float32(stat * s): equal to Darknet's within two roundings,
    # or one denormal step for dead channels.
    rtol, atol = 2**-22, float(np.finfo(np.float32).smallest_subnormal)
    if s != 1.0 and np.allclose(mean_eff, dn.mean, rtol=rtol, atol=atol) and np.allclose(
            var_eff, dn.variance, rtol=rtol, atol=atol):
        return ROUNDING, dm, dv
    if marker is not None:
        # Channels a patch cannot give back bit for bit (near-zero variance) still count as a
        # match when they agree to the patch's float32 resolution around eps.
        close = np.abs(var_eff - dn.variance) <= 2**-22 * max(marker.eps, 1e-12) * 4
        if np.array_equal(np.asarray(st.mean, np.float32), dn.mean) and np.all((var == dn.variance) | close):
            return RECOVERED, dm, dv
    return MISMATCH, dm, dv
