"""Undo a bnfix patch: the markers say what was replaced, each strategy inverts its own fit.

Patch → revert gives back the original files byte for byte, except on channels where the
float32 round trip cannot: a fit that maps several float32 originals to one stored value (dead
channels whose refitted variance went negative; a gamma scaled by a ratio just below 1) has lost
which one it was.  Those channels are reported by index, and the ``from`` digest of the
markers tells whether the whole layer came back exactly.
"""

from __future__ import annotations

from array import array
from types import EllipsisType

from .. import caffemodel, prototxt
from ..formulas import f32
from ..marker import Marker
from ..pairing import Group, Placed
from ..plan import EntryEdit, LayerPlan, digest_of, eps_edit, layout_problem, recover, stats_of, written_eps
from ..result import CAFFE_DEFAULT_EPS, Status
from ..state import Assessment, State


def plan_revert(g: Group, a: Assessment) -> LayerPlan:
    eps_now = written_eps(g)
    eps_now = CAFFE_DEFAULT_EPS if eps_now is None else eps_now
    base = LayerPlan(g.name, g.channels, Status.SKIPPED, eps_before=eps_now, eps_after=eps_now)
    m = g.marker
    if m is None:
        return base._replace(reason="no bnfix marker: nothing to revert")
    problem = next((p for p in map(layout_problem, g.entries) if p), "")
    if problem:
        return base._replace(reason=problem, warning=True)
    scale = g.scale.entries[0] if g.scale is not None and m.strategy.value == "scale" else None
    current = stats_of(g.entries[0], scale)
    splices = [sp for layer, placed in zip(g.proto, g.markers) for sp in _prototxt_undo(layer, placed)]
    eps_orig = _original_eps(m)
    base = base._replace(status=Status.REVERTED, strategy=m.strategy, splices=tuple(splices), formula=m.formula,
                         eps_after=eps_orig, changed="gamma" if m.strategy.value == "scale" else "variance",
                         scale_layer=g.scale.proto.name if g.scale is not None and scale is not None else None)
    if a.state is State.RAW_UNDER_MARKER:
        return base._replace(changes=("prototxt restored",), before=current, after=current, reference=current,
                             reason=f"the caffemodel already held statistics bnfix never wrote: {a.detail}",
                             warning=True, record=None)
    originals, exact = recover(g, m)
    edits = []
    for e, st in zip(g.entries, originals):
        blobs = {0: st.mean, 1: st.var}
        if st.s != float(e.blobs[2].first()):
            blobs[2] = array(e.blobs[2].dtype, [st.s])
        record = g.record or m
        param = {caffemodel.LAYER_BN_PARAM: _model_param(e, record)} if _touched_param(record) else {}
        edits.append(EntryEdit(e, blobs, param))
    gamma = originals[0].gamma
    if scale is not None and gamma is not None and scale.blobs[0].encode(gamma) != scale.blobs[0].raw:
        edits.append(EntryEdit(scale, {0: gamma}, {}))
    undo = dict(m.undo)
    changes = ["gamma restored" if m.strategy.value == "scale" else "variance restored"] + [
        text for key, text in (("eps", "eps restored"), ("ugs", "use_global_stats restored"),
                               ("s", "scale factor restored")) if key in undo or (g.record and g.record.get(key))]
    inexact = tuple(i for i, ok in enumerate(exact) if not ok)
    reason = ""
    if inexact or (m.origin is not None and digest_of(g, originals, m.strategy) != m.origin):
        listed = ", ".join(map(str, inexact[:8])) + (" …" if len(inexact) > 8 else "")
        reason = (f"{len(inexact)} channel(s) not restorable bit for bit (float32 round trip): {listed}" if inexact
                  else "the statistics differ from the originals bnfix patched")
    return base._replace(changes=tuple(changes), reason=reason, warning=bool(reason), edits=tuple(edits),
                         eps_before=f32(m.eps), before=current, after=originals[0], reference=originals[0],
                         inexact=inexact, record=None)


def _original_eps(m: Marker) -> float:
    text = m.get("eps")
    if text is None or text in ("none", "block"):
        return CAFFE_DEFAULT_EPS if text is not None else f32(m.eps)
    return f32(float(text.rstrip("fF")))


def _touched_param(record: Marker) -> bool:
    """Whether the patch changed the caffemodel's stored batch_norm_param (only bnfix 1.0 did)."""
    return any(record.get(k) is not None for k in ("model", "model.eps", "model.ugs"))


def _model_param(e: caffemodel.Entry, record: Marker) -> bytes | None:
    """The caffemodel's ``batch_norm_param`` payload as it was before the patch (None: drop it)."""
    if record.get("model") == "none":
        return None
    old = record.get("model.eps")
    eps: float | None = None if old in (None, "none") else f32(float(old))
    ugs: bool | EllipsisType | None = False if record.get("model.ugs") == "false" else ...
    return e.edited_bn_param(eps=eps, use_global_stats=ugs)


def _prototxt_undo(layer: prototxt.Layer, placed: Placed | None) -> list[prototxt.Splice]:
    """Splices that remove the marker and put eps / use_global_stats back as they were written."""
    if placed is None:
        return []
    undo = dict(placed.marker.undo)
    splices = [prototxt.Splice(placed.start, placed.end, "")]
    splices += eps_edit(layer, undo.get("eps"), None)[0]
    ugs = layer.bn_field("use_global_stats")
    if undo.get("ugs") == "false" and ugs is not None:
        splices.append(layer.set_value(ugs, "false"))
    return splices
