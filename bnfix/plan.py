"""Plan one layer group: decide what it needs, fit its statistics, lay out the edits to both files.

Per BatchNorm name (``pairing.Group``), from the state of both files (``state.py``):

1. **decide**: patch, or leave it (up to date; patched before for something else; statistics
   that look trained in Caffe; an eps that says someone may already have refitted the
   variance; a blob layout bnfix does not know);
2. **fit**: recover the original statistics (as stored, or undone through the markers), fix
   the scale factor (0 is a converter bug and becomes 1; runtimes that divide by ``s + 1e-5``
   get a power-of-two ``s``), and let the strategy compute what to store;
3. **lay out**: the prototxt splices (eps, use_global_stats, the marker) and the caffemodel
   entries to rewrite (BatchNorm blobs, its stored ``batch_norm_param``, bnfix's record, the
   Scale's gamma).

Nothing is encoded or written here; ``pipeline.py`` does that and verifies the bytes.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from . import caffemodel, marker, prototxt
from . import semantics as sem
from .errors import StatisticsError
from .formulas import Formula, f32, same_eps
from .marker import Marker
from .pairing import Group
from .result import CAFFE_DEFAULT_EPS, DEFAULT_EPS, LayerReport, Options, Status, StrategyName
from .state import Assessment, State
from .strategies import Fit, Stats, get

COMPENSATED_S = 1024.0  # a power of two: the statistics scale exactly (see Options.min_scale_factor)


class EntryEdit(NamedTuple):
    """One caffemodel entry to rewrite: new blob values by index, replaced fields by number."""

    entry: caffemodel.Entry
    blobs: Mapping[int, sem.Array]
    replace: Mapping[int, bytes | None]


class LayerPlan(NamedTuple):
    """What one BatchNorm name becomes, and what its report row is computed from."""

    name: str
    channels: int
    status: Status
    strategy: StrategyName | None = None
    changes: tuple[str, ...] = ()
    reason: str = ""
    warning: bool = False
    eps_before: float = CAFFE_DEFAULT_EPS
    eps_after: float = CAFFE_DEFAULT_EPS
    splices: tuple[prototxt.Splice, ...] = ()
    edits: tuple[EntryEdit, ...] = ()
    before: Stats | None = None  # the first entry's statistics as stored now
    after: Stats | None = None  # ... as planned (pipeline verifies the written bytes equal them)
    reference: Stats | None = None  # the original statistics the errors are measured from
    formula: Formula | None = None  # the Darknet formula they are measured against
    changed: str = ""
    scale_layer: str | None = None
    inexact: tuple[int, ...] = ()  # revert: channels float32 could not restore bit for bit
    next_is_scale: bool = True  # see pairing.Group
    record: Marker | None = None  # the caffemodel-side record the layer has after this run
    stale: bool = False  # patched by bnfix for other options: --check counts it as work


# -- reading a group -------------------------------------------------------------------------


def layout_problem(entry: caffemodel.Entry) -> str:
    """Why an entry's blobs are not the 3-blob BVLC (or 5-blob NVCaffe) layout ("" if they are)."""
    b = entry.blobs
    if len(b) not in (3, 5):
        return f"{len(b)} blobs: not the 3-blob BVLC or 5-blob NVCaffe layout" if b else "no statistics stored"
    if b[2].count != 1 or b[0].count != b[1].count:
        return "blob sizes do not match mean/variance/scale-factor (NVCaffe 0.14/0.15 order?)"
    return ""


def stats_of(entry: caffemodel.Entry, scale: caffemodel.Entry | None) -> Stats:
    b = entry.blobs
    return Stats(b[0].values, b[1].values, float(b[2].first()), None if scale is None else scale.blobs[0].values)


def check_scale(s: float, name: str, path: Path) -> None:
    """A negative or non-finite scale factor is corruption, whatever else happens to the layer."""
    if not math.isfinite(s) or s < 0:
        raise StatisticsError(f"{path}: layer {name!r}: scale factor (blob 2) is {float(s)!r}")


def check_values(st: Stats, name: str, path: Path) -> None:
    """Statistics about to be refitted must be numbers, and the variance not negative."""
    rows: list[tuple[str, Sequence[float] | None, bool]] = [
        ("variance", st.var, False), ("mean", st.mean, True), ("Scale gamma", st.gamma, True)]
    for what, values, neg in rows:
        if values is None:
            continue
        ch = sem.bad_channel(values, allow_negative=neg)
        if ch is not None:
            raise StatisticsError(f"{path}: layer {name!r} channel {ch}: {what} is {float(values[ch])!r}; "
                                  "refusing to patch corrupt statistics")


def written_eps(g: Group) -> float | None:
    """The eps the TEST-phase prototxt layer writes (None: Caffe's default applies)."""
    test = [layer for layer in g.proto if layer.runs_at_test] or list(g.proto)
    return test[0].eps


def _scale_entry(g: Group, strategy: StrategyName) -> caffemodel.Entry | None:
    """The Scale entry whose gamma a strategy reads (the scale strategy's only)."""
    return g.scale.entries[0] if g.scale is not None and strategy is StrategyName.SCALE else None


# -- deciding --------------------------------------------------------------------------------


def plan_patch(g: Group, a: Assessment, opts: Options, model_path: Path) -> LayerPlan:
    """Decide and plan one group for a patch run."""
    eps_written = written_eps(g)
    eps_now = CAFFE_DEFAULT_EPS if eps_written is None else eps_written
    base = LayerPlan(g.name, g.channels, Status.SKIPPED, eps_before=eps_now, eps_after=eps_now,
                     next_is_scale=g.next_is_scale, record=g.record)
    problem = next((p for p in map(layout_problem, g.entries) if p), "")
    if problem:
        return base._replace(reason=problem, warning=True)
    for e in g.entries:
        check_scale(e.blobs[2].first(), g.name, model_path)
    strategy, fallback = opts.strategy, ""
    reason = get(strategy).unusable(g)
    if reason:
        strategy, fallback = StrategyName.EPS, f"eps strategy: {reason}"
    m = g.marker
    reads_gamma = StrategyName.SCALE if StrategyName.SCALE in (strategy, m.strategy if m else None) else strategy
    current = [stats_of(e, _scale_entry(g, reads_gamma)) for e in g.entries]
    base = base._replace(before=current[0], reference=current[0], formula=opts.source, strategy=strategy,
                         scale_layer=g.scale.proto.name if strategy is StrategyName.SCALE and g.scale else None,
                         changed=get(strategy).changed)

    if a.state in (State.PATCHED, State.LEGACY):
        assert m is not None
        eps_orig = _original_eps(m, eps_now)
        same = (m.strategy is strategy and m.formula.same_as(opts.source)
                and same_eps(m.eps, opts.eps_for(strategy, eps_orig)))
        if same and a.state is State.PATCHED:
            return base._replace(status=Status.UP_TO_DATE, reason="already patched by bnfix",
                                 before=None, reference=None)
        originals, _ = recover(g, m, reads_gamma)
        if not same and not opts.force:
            return base._replace(
                reason=f"patched by bnfix ({m.strategy.value} fit to {m.formula.expression}, eps {m.eps!r}); "
                       "--force re-fits it from the original statistics", warning=True, reference=originals[0],
                stale=True)
        note = "bnfix 1.0 marker upgraded" if same else "re-fitted from the original statistics"
        # The "from" digest covers what the strategy reads: kept only if the strategy is.
        origin = m.origin if m.origin is not None and m.strategy is strategy else digest_of(g, originals, strategy)
        return _fit(g, opts, strategy, originals, origin, eps_orig, base, [note], fallback, model_path)

    trained = _trained(current[0].s, opts)
    if trained:
        return base._replace(reason=trained, warning=True)
    origin = marker.digest(g.stat_parts(strategy is StrategyName.SCALE))
    if a.state is State.RAW_UNDER_MARKER:
        assert m is not None
        note = f"statistics refitted under the existing bnfix marker: {a.detail}"
        return _fit(g, opts, strategy, current, origin, _original_eps(m, eps_now), base, [note], fallback,
                    model_path, warning=True)

    # RAW: the statistics are as the converter wrote them.
    wanted = opts.eps_for(strategy, eps_now)
    if eps_written is not None and not opts.force:
        if same_eps(eps_written, DEFAULT_EPS) or (strategy is StrategyName.EPS and same_eps(eps_written, wanted)):
            return base._replace(
                reason=f"eps is already {eps_written!r} but there is no bnfix marker: the converter may have "
                       "set eps and refitted the variance already (--force to patch)", warning=True)
    return _fit(g, opts, strategy, current, origin, eps_now, base, [], fallback, model_path)


def _trained(s: float, opts: Options) -> str:
    if s in (0.0, 1.0) or opts.force:
        return ""
    return (f"scale factor s={s:.8g}: statistics look trained in Caffe, not converted from Darknet "
            "(--force to patch anyway)")


def _original_eps(m: Marker, eps_now: float) -> float:
    """The eps the prototxt had before bnfix, from the marker's undo."""
    text = m.get("eps")
    if text is None:
        return eps_now
    if text in ("none", "block"):
        return CAFFE_DEFAULT_EPS
    return float(text.rstrip("fF"))


def recover(g: Group, m: Marker, reads: StrategyName | None = None) -> tuple[list[Stats], list[bool]]:
    """The original statistics of every entry of a patched layer, undone through its markers,
    and per channel of the first entry whether they are the originals bit for bit.

    Where float32 maps several originals to one stored value, the ``from`` digest picks the
    combination that is the original, if there are few enough to try (MAX_TRIES).  ``reads``
    SCALE also reads gamma where the marker's strategy did not change it (for a re-fit into
    the scale strategy)."""
    record = g.record if g.record is not None else m
    s_text = record.get("s")
    strategy = get(m.strategy)
    out, candidates = [], []
    for e in g.entries:
        s_stored = float(e.blobs[2].first())
        fit = Fit(m.formula, m.eps, s_stored if s_text is None else float(s_text), s_stored)
        st, hits = strategy.unfit(stats_of(e, _scale_entry(g, reads or m.strategy)), fit)
        out.append(st)
        candidates.append(hits)
    first = candidates[0]
    if m.origin is None or digest_of(g, out, m.strategy) == m.origin:
        return out, [m.origin is not None or len(h) == 1 for h in first]
    resolved = _resolve(g, out, first, m.strategy, m.origin)
    if resolved is not None:
        return resolved, [True] * len(first)
    return out, [len(h) == 1 for h in first]


MAX_TRIES = 4096  # combinations of ambiguous channels tried against the ``from`` digest


def _resolve(g: Group, stats: list[Stats], hits: list[list[float]], strategy: StrategyName,
             origin: str) -> list[Stats] | None:
    """The choice among ambiguous channels (first entry) whose digest is ``origin``, if any."""
    import itertools

    field = get(strategy).field
    ambiguous = [(i, h) for i, h in enumerate(hits) if len(h) > 1]
    if not ambiguous or any(not h for h in hits) or math.prod(len(h) for _, h in ambiguous) > MAX_TRIES:
        return None
    base = getattr(stats[0], field)
    for choice in itertools.product(*(h for _, h in ambiguous)):
        values = array(base.typecode, base)
        for (i, _), v in zip(ambiguous, choice):
            values[i] = v
        first = stats[0]._replace(var=values) if field == "var" else stats[0]._replace(gamma=values)
        trial = [first] + stats[1:]
        if digest_of(g, trial, strategy) == origin:
            return trial
    return None


def digest_of(g: Group, stats: Sequence[Stats], strategy: StrategyName) -> str:
    """The digest ``Group.stat_parts`` would give (for ``strategy``) if the entries held ``stats``."""
    return marker.digest(_parts(g, stats, strategy is StrategyName.SCALE))


def _parts(g: Group, stats: Sequence[Stats], with_scale: bool) -> list[bytes]:
    parts = []
    for e, st in zip(g.entries, stats):
        b = e.blobs
        parts += [b[0].encode(st.mean), b[1].encode(st.var), b[2].encode([st.s])] + [x.raw for x in b[3:]]
    if with_scale and g.scale is not None:
        for i, e in enumerate(g.scale.entries):
            gamma = stats[0].gamma if i == 0 else None
            parts += [e.blobs[0].raw if gamma is None else e.blobs[0].encode(gamma)] + [x.raw for x in e.blobs[1:]]
    return parts


# -- fitting and laying out ------------------------------------------------------------------


def _fit(g: Group, opts: Options, strategy: StrategyName, originals: list[Stats], origin: str, eps_orig: float,
         base: LayerPlan, changes: list[str], fallback: str, model_path: Path, warning: bool = False) -> LayerPlan:
    """The plan that stores ``strategy``'s fit of the original statistics (one per entry)."""
    for st in originals:
        check_values(st, g.name, model_path)
    eps_new = decimal_eps(opts.eps_for(strategy, eps_orig))
    s_orig = originals[0].s
    s_eff = s_orig or 1.0
    s_new = s_eff
    if s_eff < opts.min_scale_factor:
        if math.frexp(s_eff)[0] == 0.5:  # a power of two: the statistics scale exactly
            s_new = COMPENSATED_S
        else:
            changes.append(f"scale factor {s_eff:.8g} kept (not a power of two)")
    fit = Fit(opts.source, eps_new, s_orig, s_new)
    new = [get(strategy).fit(st, fit._replace(s_orig=st.s, s_new=s_new if st.s == s_orig else (st.s or 1.0)))
           for st in originals]
    changes.insert(0, "gamma refolded" if strategy is StrategyName.SCALE else "variance recomputed")
    if s_orig == 0:
        changes.append("scale factor fixed (s=0 → 1)")
    if s_new != s_eff:
        changes.append(f"scale factor {s_eff:g} → {s_new:g} (statistics scaled to match)")
    if fallback:
        changes.append(fallback)

    # The caffemodel keeps its own undo information; an earlier patch's record already has it.
    m = g.marker
    prior = g.record if g.record is not None else (m if m is not None and m.legacy else None)
    record = Marker(strategy, opts.source, eps_new, digest_of(g, new, strategy), origin,
                    tuple(_entry_undo(g.entries[0], prior, s_orig, s_new)))
    # Only blob values change: every entry keeps its length (and every later byte its offset).
    edits = []
    for e, st in zip(g.entries, new):
        blobs: dict[int, sem.Array] = {0: st.mean, 1: st.var}
        if st.s != float(e.blobs[2].first()):
            blobs[2] = sem.to_f32([st.s])
        edits.append(EntryEdit(e, blobs, {}))
    if g.scale is not None and new[0].gamma is not None:
        se = g.scale.entries[0]
        if se.blobs[0].encode(new[0].gamma) != se.blobs[0].raw:
            edits.append(EntryEdit(se, {0: new[0].gamma}, {}))
    # The eps strategy always writes its eps (the variance means nothing without it); the
    # scale strategy leaves an unchanged eps as the file had it.
    keep_eps = strategy is not StrategyName.EPS and same_eps(eps_new, eps_orig)
    splices, ugs_fixed = _prototxt_edits(g, record, None if keep_eps else repr(eps_new))
    if ugs_fixed:
        changes.append("use_global_stats fixed")
    if not same_eps(base.eps_before, eps_new):
        changes.append("eps set")
    return base._replace(
        status=Status.PATCHED, changes=tuple(dict.fromkeys(changes)), eps_after=eps_new, warning=warning,
        splices=tuple(splices), edits=tuple(edits), after=new[0], reference=originals[0], record=record)


def _entry_undo(e: caffemodel.Entry, prior: Marker | None, s_orig: float, s_new: float) -> list[tuple[str, str]]:
    """What the caffemodel entry held before bnfix: its stored param and scale factor."""
    # bnfix 2 leaves the caffemodel's stored batch_norm_param alone (no runtime reads it); a
    # bnfix 1.0 patch changed it, and what it replaced is carried over for revert.
    undo = [] if prior is None else [(k, v) for k, v in prior.undo if k in marker.RECORD_KEYS and k != "s"]
    s_text = None if prior is None else prior.get("s")
    if s_text is not None:
        return undo + [("s", s_text)]
    if s_new != s_orig:
        undo.append(("s", repr(float(s_orig))))
    return undo


def _prototxt_edits(g: Group, record: Marker, new_text: str | None) -> tuple[list[prototxt.Splice], bool]:
    """eps (``new_text``; None: as it was before bnfix), use_global_stats and the marker, in
    every prototxt layer of this name."""
    splices: list[prototxt.Splice] = []
    ugs_fixed = False
    for layer, placed in zip(g.proto, g.markers):
        old = placed.marker if placed is not None else None
        undo: list[tuple[str, str]] = []
        eps_splices, eps_undo = eps_edit(layer, old.get("eps") if old else None, new_text)
        splices += eps_splices
        if eps_undo is not None:
            undo.append(("eps", eps_undo))
        ugs = layer.bn_field("use_global_stats")
        if old is not None and old.get("ugs") is not None:
            undo.append(("ugs", "false"))
        elif ugs is not None and layer.use_global_stats is False and layer.runs_at_test:
            splices.append(layer.set_value(ugs, "true"))
            undo.append(("ugs", "false"))
            ugs_fixed = True
        comment = record._replace(undo=tuple(undo)).comment()
        at = layer.doc.line_end(layer.field.start)
        if layer.doc.line_break_at(at) == "\r":
            # Caffe's parser ends a comment only at LF: on a CR-terminated line the marker needs
            # its own, or it would comment out the rest of the file (pairing.find_marker knows it).
            comment += "\n"
        if placed is not None:
            splices.append(prototxt.Splice(placed.start, placed.end, comment))
        else:
            splices.append(prototxt.Splice(at, at, comment, order=-1))  # before a field inserted there
    return splices, ugs_fixed


def decimal_eps(eps: float) -> float:
    """The eps as bnfix writes it: the shortest decimal that is the same float32 (1e-06, not
    9.99999997e-07), since Caffe reads it into a float32 field."""
    for digits in range(1, 18):
        candidate = float(f"{eps:.{digits}g}")
        if f32(candidate) == f32(eps):
            return candidate
    return eps


def eps_edit(layer: prototxt.Layer, original: str | None, new_text: str | None
             ) -> tuple[list[prototxt.Splice], str | None]:
    """Splices that give ``layer`` the eps ``new_text`` (None: its original), and the undo value
    to record.  ``original`` is what an earlier bnfix patch recorded ("none": no eps field
    inside an existing batch_norm_param, "block": no batch_norm_param, else the old text), or
    None when the layer's current eps is its original."""
    f = layer.bn_field("eps")
    doc = layer.doc
    if original is None:
        if new_text is None:
            return [], None
        if f is not None:
            old = doc.scalar(f)
            return ([layer.set_value(f, new_text)] if old != new_text else []), old
        if layer.bn_param is not None:
            assert layer.bn_param.value is not None
            return [layer.add_field(layer.bn_param.value, f"eps: {new_text}")], "none"
        unit = layer.block_indent()
        return [layer.add_field(layer.body, f"batch_norm_param {{\n{unit}eps: {new_text}\n}}")], "block"
    if new_text is not None:
        if f is not None and doc.scalar(f) != new_text:
            return [layer.set_value(f, new_text)], original
        return [], original
    # Back to the original text.
    if original == "block" and layer.bn_param is not None:
        return [remove_field(doc, layer.body, layer.bn_param)], None
    if original == "none" and f is not None and layer.bn_param is not None and layer.bn_param.value is not None:
        return [remove_field(doc, layer.bn_param.value, f)], None
    if f is not None and doc.scalar(f) != original:
        return [layer.set_value(f, original)], None
    return [], None


def remove_field(doc: prototxt.Document, parent: prototxt.Message, f: prototxt.Field) -> prototxt.Splice:
    """Remove a field a patch appended: exactly the text ``Layer.add_field`` inserted."""
    i = parent.fields.index(f)
    start = parent.fields[i - 1].end if i else parent.open + 1
    if not doc.same_line(start, f.start):
        start = doc.line_end(start)
    return prototxt.Splice(start, f.end, "")


# -- the report ------------------------------------------------------------------------------


def report(p: LayerPlan, written: Stats | None) -> LayerReport:
    """The plan's row, with every number computed from ``written`` (the decoded output)."""
    base = LayerReport(p.name, p.channels, p.status, p.strategy, p.changes, p.reason, p.warning,
                       p.eps_before, p.eps_after, p.changed, scale_layer=p.scale_layer)
    if p.reference is None or p.formula is None or p.before is None:
        return base._replace(max_rel_change=None if p.status is Status.SKIPPED else 0.0)
    ref = p.reference
    target = sem.darknet_denominator([v / (ref.s or 1.0) for v in ref.var], p.formula)

    def err(st: Stats, eps: float) -> list[float]:
        return sem.effective_error(sem.caffe_denominator(st.var, st.s, eps), st.gamma, ref.gamma, target)

    before = err(p.before, p.eps_before)
    b_value, b_channel = sem.worst(before)
    if written is None:
        return base._replace(err_before=b_value, err_after=b_value, worst_channel=b_channel, max_rel_change=None)
    after = err(written, p.eps_after)
    a_value, a_channel = sem.worst(after)
    changed_old = p.before.gamma if p.changed == "gamma" else p.before.var
    changed_new = written.gamma if p.changed == "gamma" else written.var
    change = sem.max_relative_change(changed_old or [], changed_new or [])
    return base._replace(
        err_before=b_value, err_after=a_value, worst_channel=a_channel,
        max_rel_change=change if math.isfinite(change) else None,
        negative_channels=sum(1 for v in written.var if v < 0))
