"""Undo a bnfix patch: the marker says what was replaced, the inverse map gives the variance back.

Patch → revert returns the original files byte for byte, except on channels where the float32
round trip cannot: a patch that maps several float32 variances to one stored value (near-zero
channels whose refitted variance went negative) has lost which one it was.  Those channels are
reported by index; their variance is restored to the nearest value that re-patches identically.
"""

from __future__ import annotations

from pathlib import Path

from . import caffemodel, prototxt
from . import semantics as sem
from .formulas import f32
from .patch import (CAFFE_DEFAULT_EPS, REVERTED, SKIPPED, Entries, LayerPlan, LayerReport, Options, Result,
                    _Group, checked_entries, find_marker, run, stats_of)


def revert(prototxt_path: str | Path, caffemodel_path: str | Path) -> Result:
    """Plan the pre-bnfix files of a patched pair (``result.save`` writes them)."""
    return run(prototxt_path, caffemodel_path, Options(), _plan_revert, mode="revert")


def _plan_revert(g: _Group, model_path: Path) -> LayerPlan:
    first = g.model[0]
    channels = first.blobs[0].count if first.blobs else 0
    if g.marker is None:
        report = LayerReport(g.name, channels, SKIPPED, reason="no bnfix marker: nothing to revert")
        return LayerPlan(SKIPPED, [], [], lambda: (report, {}))
    marker = g.marker
    undo = dict(marker.undo)
    edits = []
    for bn in checked_entries(g, model_path):
        param, drop = _model_param(bn, undo)
        edits.append((bn, param, drop, len(bn.rebuilt({}, param, drop_param=drop))))
    splices = [sp for layer in g.proto for sp in _prototxt_undo(layer)]
    layout = [(bn.layer.start, bn.layer.end, size) for bn, _, _, size in edits]

    def finish() -> tuple[LayerReport, Entries]:
        entries: Entries = {}
        report = None
        for bn, param, drop, _ in edits:
            st = stats_of(bn)
            values, exact = sem.unpatched_variance(st.var, st.s, marker.formula, marker.eps)
            blob_values = {1: values}
            s_after = st.s
            if undo.get("s") == "0":
                blob_values[2] = [0.0]
                s_after = 0.0
            entries[bn.layer.start] = bn.rebuilt(blob_values, param, drop_param=drop)
            if report is None:
                report = _report(g, channels, marker, undo, st, values, exact, s_after)
        return report, entries

    return LayerPlan(REVERTED, splices, layout, finish)


def _report(g: _Group, channels: int, marker, undo: dict[str, str], st, values, exact, s_after) -> LayerReport:
    eps_after = _original_eps(undo)
    ref = sem.original_variance(st.var, st.s, marker.formula, marker.eps)
    err = sem.denominator_error(values, s_after, eps_after, ref, marker.formula)
    inexact = [i for i, ok in enumerate(exact) if not ok]
    changes = ["variance restored"] + [text for key, text in (
        ("eps", "eps restored"), ("ugs", "use_global_stats restored"), ("s", "scale factor restored (s=0)"))
        if key in undo]
    reason = ""
    if inexact:
        listed = ", ".join(map(str, inexact[:8])) + (" …" if len(inexact) > 8 else "")
        reason = f"{len(inexact)} channel(s) not restorable bit for bit (float32 round trip): {listed}"
    value, channel = sem.worst(err)
    return LayerReport(
        g.name, channels, REVERTED, changes=tuple(changes), reason=reason, warning=bool(inexact),
        eps_before=f32(marker.eps), eps_after=eps_after, max_rel_var_change=sem.max_relative_change(st.var, values),
        negative_channels=sum(v < 0 for v in values), err_before=None, err_after=value, worst_channel=channel,
    )


def _original_eps(undo: dict[str, str]) -> float:
    text = undo.get("eps", "none")
    if text in ("none", "block"):
        return CAFFE_DEFAULT_EPS
    try:
        return float(text.rstrip("fF"))
    except ValueError:
        return CAFFE_DEFAULT_EPS


def _model_param(bn: caffemodel.BatchNormLayer, undo: dict[str, str]) -> tuple[bytes | None, bool]:
    """The caffemodel's ``batch_norm_param`` payload as it was before the patch (or drop it)."""
    if undo.get("model") == "none":
        return None, True
    if bn.param_bytes is None:
        return None, False
    old = undo.get("model.eps", "none")
    eps = None if old == "none" else f32(float(old))
    ugs = False if undo.get("model.ugs") == "false" else ...
    return bn.edited_param(eps=eps, use_global_stats=ugs), False


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
