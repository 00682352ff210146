"""Undo a bnfix patch: the marker says what was replaced, the inverse map gives the variance back.

Patch → revert returns the original files byte for byte, except on channels where the float32
round trip cannot: a patch that maps several float32 variances to one stored value (near-zero
channels whose refitted variance went negative) has lost which one it was.  Those channels are
reported by index; their variance is restored to the nearest value that re-patches identically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import caffemodel, prototxt
from . import semantics as sem
from .errors import BnfixError
from .patch import (CAFFE_DEFAULT_EPS, SKIPPED, LayerReport, Options, Result, _Group, find_marker, run, stats_of)

REVERTED = "reverted"


def revert(prototxt_path: str | Path, caffemodel_path: str | Path) -> Result:
    """Compute the pre-bnfix files of a patched pair in memory (``result.save`` writes them)."""
    return run(prototxt_path, caffemodel_path, Options(), _revert_group, mode="revert")


def _revert_group(g: _Group, model_path: Path):
    first = g.model[0]
    channels = first.blobs[0].count if first.blobs else 0
    if g.marker is None:
        return LayerReport(g.name, channels, SKIPPED, reason="no bnfix marker: nothing to revert"), [], {}
    marker = g.marker
    eps_before = sem.f32(marker.eps)
    undo = dict(marker.undo)
    replacements: dict[int, tuple[int, int, bytes]] = {}
    report = None
    for bn in g.model:
        st = stats_of(bn)
        if isinstance(st, str):
            raise BnfixError(f"{model_path}: layer {g.name!r}: {st}")
        values, exact = sem.unpatched_variance(st.var, st.s, marker.formula, marker.eps)
        blob_values = {1: values.astype(bn.blobs[1].values.dtype)}
        s_after = st.s
        if undo.get("s") == "0":
            blob_values[2] = np.zeros(1, bn.blobs[2].values.dtype)
            s_after = 0.0
        param, drop = _model_param(bn, undo)
        entry = bn.rebuilt(blob_values, param, drop_param=drop)
        replacements[bn.layer.index] = (bn.layer.start, bn.layer.end, entry)
        if report is None:
            eps_after = _original_eps(undo)
            ref = sem.original_variance(st.var, st.s, marker.formula, marker.eps)
            err = sem.denominator_error(values, s_after, eps_after, ref, marker.formula)
            inexact = np.flatnonzero(~exact)
            changes = ["variance restored"] + [c for k, c in (("eps", "eps restored"), ("ugs", "use_global_stats restored"),
                                                                  ("s", "scale factor restored (s=0)")) if k in undo]
            reason = ""
            if inexact.size:
                listed = ", ".join(map(str, inexact[:8])) + (" …" if inexact.size > 8 else "")
                reason = f"{inexact.size} channel(s) not restorable bit for bit (float32 round trip): {listed}"
            report = LayerReport(
                g.name, channels, REVERTED, changes=tuple(changes), reason=reason, warning=bool(inexact.size),
                eps_before=eps_before, eps_after=eps_after,
                max_rel_var_change=sem.max_relative_change(st.var, values),
                negative_channels=int((values < 0).sum()), err_before=None,
                err_after=float(err.max(initial=0)), worst_channel=int(np.argmax(err)) if err.size else 0,
            )
    splices = [sp for layer in g.proto for sp in _prototxt_undo(layer)]
    return report, splices, replacements


def _original_eps(undo: dict[str, str]) -> float:
    text = undo.get("eps", "none")
    if text in ("none", "block"):
        return CAFFE_DEFAULT_EPS
    try:
        return float(text.rstrip("fF"))
    except ValueError:
        return CAFFE_DEFAULT_EPS


def _model_param(bn: caffemodel.BatchNormLayer, undo: dict[str, str]):
    """The caffemodel's ``batch_norm_param`` as it was before the patch (or drop it)."""
    if undo.get("model") == "none":
        return None, True
    param = bn.param()
    if param is None:
        return None, False
    old = undo.get("model.eps", "none")
    if old == "none":
        param.ClearField("eps")
    else:
        param.eps = float(old)
    if undo.get("model.ugs") == "false":
        param.use_global_stats = False
    return param, False


def _prototxt_undo(layer: prototxt.Layer) -> list[prototxt.Splice]:
    """Splices that remove the marker and put eps / use_global_stats back as they were written."""
    found = find_marker(layer)
    if found is None:  # a phase-split twin without its own marker: nothing of ours in it
        return []
    marker, m_start, m_end = found
    doc = layer.doc
    undo = dict(marker.undo)
    splices = [prototxt.Splice(m_start, m_end, "")]
    eps = layer.bn_field("eps")
    old = undo.get("eps")
    if old == "block" and layer.bn_param is not None:
        splices.append(_remove_field(doc, layer.body, layer.bn_param))
    elif old == "none" and eps is not None:
        splices.append(_remove_field(doc, layer.bn_param.value, eps))
    elif old is not None and eps is not None:
        splices.append(layer.set_value(eps, old))
    ugs = layer.bn_field("use_global_stats")
    if undo.get("ugs") == "false" and ugs is not None:
        splices.append(layer.set_value(ugs, "false"))
    return splices


def _remove_field(doc: prototxt.Document, parent: prototxt.Message, f: prototxt.Field) -> prototxt.Splice:
    """Remove a field the patch appended: exactly the text ``Layer.add_field`` inserted."""
    i = parent.fields.index(f)
    start = parent.fields[i - 1].end if i else parent.open + 1
    if not doc.same_line(start, f.start):
        start = doc.line_end(start)
    return prototxt.Splice(start, f.end, "")
