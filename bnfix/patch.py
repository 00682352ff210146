"""Plan and apply the fix: pair BatchNorm layers by name, decide per layer, edit both files.

Flow: ``read`` both inputs → ``plan`` per layer name (the decision, the prototxt splices and
the size of every rewritten caffemodel layer; pure Python) → ``apply`` (the arithmetic: refit
the variance, encode the layer) → ``verify`` (re-decode the new bytes and recompute Caffe's
float32 denominator) → a :class:`Result` the CLI renders and saves.  Planning fixes the output
layout before any number is computed, so ``Result.save`` copies the untouched bytes while the
numbers are being computed (see ``caffemodel.write``).

How bnfix knows a layer is already patched: it appends a marker comment to the line that opens
the layer in the prototxt, ``layer {  # bnfix: fitted to sqrt(var) + 1e-06, eps 1e-06 [undo
eps=none]``.  The marker names the formula and eps used and what the patch replaced, so a
re-patch (``force``) or a revert can recover the original statistics exactly.  The stored eps
alone cannot tell: a converter may have written ``eps: 1e-06`` without refitting the variance.
So a layer whose eps already equals the target but has no marker is skipped with a warning
(patch it with ``force``).
"""

from __future__ import annotations

import math
import re
from collections import namedtuple
from pathlib import Path

from . import atomic, caffemodel, prototxt
from . import semantics as sem
from .errors import BnfixError
from .formulas import DEFAULT_SOURCE, PRESETS, f32, parse_source, same_eps

CAFFE_DEFAULT_EPS = 1e-5
PATCHED, SKIPPED, UP_TO_DATE, REVERTED = "patched", "skipped", "up to date", "reverted"

# -- the marker ------------------------------------------------------------------------------

_MARKER = re.compile(r"  # bnfix: fitted to (?P<expr>[^,\]]+), eps (?P<eps>\S+) \[undo(?P<undo>[^\]]*)\]")


class Marker(namedtuple("Marker", "formula eps undo")):
    """What a bnfix patch wrote into a layer (formula, eps) and what it replaced: ``undo`` pairs
    such as ("eps", "none"), ("ugs", "false"), ("s", "0"), for revert and re-patch."""

    __slots__ = ()

    def render(self) -> str:
        undo = "".join(f" {k}={v}" for k, v in self.undo)
        return f"  # bnfix: fitted to {self.formula.expression}, eps {self.eps!r} [undo{undo}]"


def find_marker(layer: prototxt.Layer) -> tuple[Marker, int, int] | None:
    """The marker on the layer's opening line and its span, if bnfix patched it."""
    doc = layer.doc
    line_start = doc.line_start(layer.field.start)
    for tok in doc.comments_between(line_start, doc.line_end(layer.field.start)):
        # The marker starts with the two spaces bnfix writes before it: outside the comment
        # token when it stands alone, inside it when appended to an existing comment.
        m = _MARKER.search(doc.text, max(tok.start - 2, line_start), tok.end)
        if m:
            try:
                formula = parse_source(m["expr"])
                eps = float(m["eps"])
            except ValueError:
                raise doc.error(tok.start, f"layer {layer.name!r}: unreadable bnfix marker") from None
            undo = tuple(tuple(kv.split("=", 1)) for kv in m["undo"].split() if "=" in kv)
            return Marker(formula, eps, undo), m.start(), m.end()
    return None


# -- options and results ---------------------------------------------------------------------


class Options(namedtuple("Options", "source target_eps force", defaults=(PRESETS[DEFAULT_SOURCE], 1e-6, False))):
    """What the patched model must reproduce (``source``), the eps to store, and whether to
    ``force`` layers that look patched or not converted from Darknet."""

    __slots__ = ()

    def __new__(cls, *args, **kw):
        self = super().__new__(cls, *args, **kw)
        if not (self.target_eps >= 0 and math.isfinite(self.target_eps)):
            raise BnfixError(f"target eps must be a finite number >= 0, not {self.target_eps!r}")
        return self


class LayerReport(namedtuple(
    "LayerReport",
    "name channels status changes reason warning eps_before eps_after max_rel_var_change "
    "negative_channels err_before err_after worst_channel",
    defaults=((), "", False, CAFFE_DEFAULT_EPS, CAFFE_DEFAULT_EPS, 0.0, 0, 0.0, 0.0, 0),
)):
    """One BatchNorm layer's row of the diff summary (every number from the written bytes).

    ``status`` is PATCHED, SKIPPED (``reason`` says why), UP_TO_DATE (patched before) or
    REVERTED; ``err_before``/``err_after`` are the largest relative error of Caffe's
    denominator against Darknet's over the channels, None when unknown (a layer patched by an
    earlier run: its original statistics are gone).
    """

    __slots__ = ()


Entries = dict[int, bytes]  # caffemodel offset of a layer entry -> its new bytes


class LayerPlan(namedtuple("LayerPlan", "status splices layout finish")):
    """What one BatchNorm name becomes: prototxt edits and caffemodel layout now, numbers later.

    ``layout`` holds ``(start, end, new length)`` for every caffemodel entry to rewrite;
    ``finish()`` does the arithmetic and returns the report and ``{start: new entry bytes}``.
    """

    __slots__ = ()


class Result:
    """The outcome of :func:`patch`: the plan, per-layer reports and new file contents.

    Nothing is written until :meth:`save`.  The numbers (``layers``) are computed on first use,
    or by ``save`` while it copies the untouched bytes.
    """

    def __init__(self, prototxt_path: Path, caffemodel_path: Path, options: Options, plans: list[LayerPlan],
                 warnings: list[str], new_prototxt: str, original_prototxt: str, model_size: int,
                 model_mtime: int, mode: str = "patch"):
        self.prototxt, self.caffemodel, self.options = prototxt_path, caffemodel_path, options
        self.warnings, self.mode = warnings, mode
        self.new_prototxt, self.original_prototxt = new_prototxt, original_prototxt
        self.outputs: tuple[Path, Path] | None = None
        self.darknet = None  # a crosscheck.CrossCheck when the Darknet originals were given
        self._plans = plans
        self._layout = sorted(item for p in plans for item in p.layout)
        self._model_size, self._model_mtime = model_size, model_mtime
        self._reports: list[LayerReport] | None = None
        self._entries: Entries = {}

    @property
    def layers(self) -> list[LayerReport]:
        """One report per BatchNorm name (computing the numbers if not done yet)."""
        self.compute()
        return self._reports

    def compute(self) -> Entries:
        """Refit, encode and verify every planned layer (once); bad statistics raise here.

        Returns the new caffemodel entries by offset; ``save`` calls it while it copies.
        """
        if self._reports is None:
            reports = []
            for plan in self._plans:
                report, entries = plan.finish()
                reports.append(report)
                self._entries.update(entries)
            self._reports = reports
        return self._entries

    @property
    def needs_work(self) -> bool:
        """Whether a write would change a layer (what ``--check`` reports); known from the plan."""
        return any(p.status in (PATCHED, REVERTED) for p in self._plans)

    @property
    def changed(self) -> bool:
        return bool(self._layout) or self.new_prototxt != self.original_prototxt

    def save(self, prototxt_out: str | Path, caffemodel_out: str | Path, *, backup: bool = False,
             sync: bool = True, progress=None) -> None:
        """Write both outputs atomically (temp file, fsync, rename); all or nothing.

        ``backup`` keeps ``<output>.orig`` copies of files about to be replaced (for in-place);
        ``sync=False`` skips the fsyncs (see :func:`bnfix.atomic.write_all`).  A statistics
        error found while computing aborts the write and leaves no file behind.
        """
        outs = (Path(prototxt_out), Path(caffemodel_out))
        for out, src in zip(outs, (self.prototxt, self.caffemodel)):
            if out.exists() and src.exists() and out.samefile(src) and not backup:
                raise BnfixError(f"{out}: output would overwrite its input (use --in-place to mean that)")
        text = self.new_prototxt.encode("utf-8")

        def write_model(fd: int) -> None:
            caffemodel.write(self.caffemodel, self._model_size, self._layout, self.compute, fd, progress)

        if Path(self.caffemodel).stat().st_mtime_ns != self._model_mtime:
            raise BnfixError(f"{self.caffemodel}: the file changed while bnfix was running")
        atomic.write_all([(outs[0], text), (outs[1], write_model)], backup=backup, sync=sync)
        self.outputs = outs


# -- reading and planning --------------------------------------------------------------------


class _Group:
    """All entries of one BatchNorm name: prototxt layers (phase-split duplicates) and model layers."""

    def __init__(self, name: str, proto: list[prototxt.Layer], model: list[caffemodel.BatchNormLayer]):
        self.name, self.proto, self.model = name, proto, model
        self.marker: Marker | None = None


class Decision(namedtuple("Decision", "status reason warning", defaults=("", False))):
    __slots__ = ()


def decide(eps_written: float | None, s: float, marker: Marker | None, opts: Options) -> Decision:
    """Whether to patch one layer, from what the files say (pure; the heart of "never double-correct")."""
    if marker is not None:
        if marker.formula.same_as(opts.source) and same_eps(marker.eps, opts.target_eps):
            return Decision(UP_TO_DATE, "already patched by bnfix")
        if not opts.force:
            return Decision(SKIPPED, f"patched by bnfix for {marker.formula.expression}, eps {marker.eps!r}; "
                            "--force re-fits it from the original statistics", warning=True)
        return Decision(PATCHED)
    if s not in (0.0, 1.0) and not opts.force:
        return Decision(SKIPPED, f"scale factor s={s:.8g}: statistics look trained in Caffe, not converted "
                        "from Darknet (--force to patch anyway)", warning=True)
    # Only an eps written in the file is ambiguous: Caffe's default (no eps field) says the
    # converter left eps alone, so the variance is certainly raw.
    if eps_written is not None and same_eps(eps_written, opts.target_eps) and not opts.force:
        return Decision(SKIPPED, f"eps is already {opts.target_eps!r} but there is no bnfix marker: the "
                        "converter may have set eps without refitting the variance (--force to patch)",
                        warning=True)
    return Decision(PATCHED)


def patch(prototxt_path: str | Path, caffemodel_path: str | Path, options: Options | None = None, **kw) -> Result:
    """Read a converted pair and plan the patch (nothing is written).

    ``options`` or keyword arguments ``source`` (a preset name, a ``sqrt(var+A)+B`` string or a
    :class:`~bnfix.formulas.Formula`), ``target_eps`` and ``force``.  ``result.layers`` gives
    the per-layer reports; ``result.save(...)`` writes the outputs.
    """
    if options is None:
        if isinstance(kw.get("source"), str):
            try:
                kw["source"] = parse_source(kw["source"])
            except ValueError as exc:
                raise BnfixError(str(exc)) from None
        options = Options(**kw)
    elif kw:
        raise TypeError("give either options or keyword arguments, not both")
    return run(prototxt_path, caffemodel_path, options, lambda g, mp: _plan_patch(g, options, mp))


def run(prototxt_path, caffemodel_path, options: Options, plan_layer, mode: str = "patch") -> Result:
    """Read both files, pair their BatchNorm layers, plan each with ``plan_layer``, verify the
    prototxt edits.  ``plan_layer(group, caffemodel_path) -> LayerPlan``; patch and revert
    differ only there."""
    pp, mp = Path(prototxt_path), Path(caffemodel_path)
    for p in (pp, mp):
        if not p.exists():
            raise BnfixError(f"{p}: no such file")
        if p.is_dir():
            raise BnfixError(f"{p}: is a directory, not a file")
    _refuse_swapped(pp, mp)
    doc = prototxt.read(pp)
    with caffemodel.Model(mp) as model:
        groups, warnings = pair_layers(doc, model)
        plans = [plan_layer(g, mp) for g in groups]
        size, mtime = model.size, model.mtime_ns
    splices = [sp for p in plans for sp in p.splices]
    _verify_prototxt(doc, splices, groups)
    return Result(pp, mp, options, plans, warnings, doc.render(splices), doc.text, size, mtime, mode=mode)


def _refuse_swapped(pp: Path, mp: Path) -> None:
    """A binary first argument and a text second one: say so, rather than two confusing errors."""
    try:
        with open(pp, "rb") as f:
            head_p = f.read(4096)
        with open(mp, "rb") as f:
            head_m = f.read(4096)
    except OSError:
        return  # the readers below report the file that cannot be read
    if b"\0" in head_p and head_m and b"\0" not in head_m and _textual(head_m):
        raise BnfixError(f"{pp}: is binary and {mp} is text: the arguments look swapped "
                         "(give the .prototxt first, then the .caffemodel)")


def _textual(head: bytes) -> bool:
    return all(b in b"\t\r\n" or 32 <= b < 127 or b >= 128 for b in head)


def pair_layers(doc: prototxt.Document, model: caffemodel.Model) -> tuple[list[_Group], list[str]]:
    """Group the prototxt's BatchNorm layers by name and find each in the caffemodel."""
    by_name: dict[str, list[caffemodel.Layer]] = {}
    for layer in model.layers:
        by_name.setdefault(layer.name, []).append(layer)
    groups: dict[str, _Group] = {}
    for layer in doc.layers():
        if layer.type != "BatchNorm":
            continue
        if not layer.name:
            raise doc.error(layer.field.start, "BatchNorm layer without a name: it cannot be matched to the caffemodel")
        layer.validate()  # parse errors in its batch_norm_param surface here, naming the line
        g = groups.get(layer.name)
        if g is None:
            entries = by_name.get(layer.name, [])
            if not entries:
                raise BnfixError(f"{model.path}: has no layer {layer.name!r}, which is a BatchNorm layer in "
                                 f"{doc.path} (do the two files belong together?)")
            wrong = [e for e in entries if e.type != "BatchNorm"]
            if wrong:
                raise BnfixError(f"{model.path}: layer {layer.name!r} is {wrong[0].type!r} there but BatchNorm in {doc.path}")
            g = groups[layer.name] = _Group(layer.name, [], [model.batch_norm(e) for e in entries])
        g.proto.append(layer)
        found = find_marker(layer)
        if found and g.marker is None:
            g.marker = found[0]
    warnings = []
    extra = [l.name for l in model.layers if l.type == "BatchNorm" and l.name not in groups]
    if extra:
        warnings.append(f"{len(extra)} BatchNorm layer(s) only in the caffemodel were left alone: "
                        + ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
    if not groups:
        warnings.append(f"{doc.path}: no BatchNorm layers: nothing to patch")
    return list(groups.values()), warnings


def layout_problem(bn: caffemodel.BatchNormLayer) -> str | None:
    """Why a layer's blobs are not the 3-blob BVLC (or 5-blob NVCaffe) layout, or None."""
    b = bn.blobs
    if len(b) not in (3, 5):
        return f"{len(b)} blobs: not the 3-blob BVLC or 5-blob NVCaffe layout" if b else "no statistics stored"
    if b[2].count != 1 or b[0].count != b[1].count:
        return "blob sizes do not match mean/variance/scale-factor (NVCaffe 0.14/0.15 order?)"
    return None


class Stats(namedtuple("Stats", "mean var s")):
    """A caffemodel BatchNorm layer's statistics: mean and variance as stored (float arrays) and
    the scale factor ``s``."""

    __slots__ = ()


def stats_of(bn: caffemodel.BatchNormLayer) -> Stats:
    return Stats(bn.blobs[0].values, bn.blobs[1].values, float(bn.blobs[2].first()))


def checked_entries(g: _Group, path: Path) -> list[caffemodel.BatchNormLayer]:
    """The caffemodel entries of a layer about to be rewritten, each in a usable layout and with
    a sane scale factor (duplicates of one name must all be)."""
    for bn in g.model:
        problem = layout_problem(bn)
        if problem:
            raise BnfixError(f"{path}: layer {g.name!r}: {problem}")
        check_scale(bn.blobs[2].first(), g.name, path)
    return g.model


def check_scale(s: float, name: str, path: Path) -> None:
    """A negative or non-finite scale factor is corruption, whatever else happens to the layer."""
    if not math.isfinite(s) or s < 0:
        raise BnfixError(f"{path}: layer {name!r}: scale factor (blob 2) is {float(s)!r}")


def _check_values(stats: Stats, name: str, path: Path) -> None:
    """Statistics about to be refitted must be numbers, and the variance not negative."""
    for what, values, neg in (("variance", stats.var, False), ("mean", stats.mean, True)):
        ch = sem.bad_channel(values, allow_negative=neg)
        if ch is not None:
            raise BnfixError(f"{path}: layer {name!r} channel {ch}: {what} is {float(values[ch])!r}; "
                             "refusing to patch corrupt statistics")


def reference_variance(st: Stats, marker: Marker | None) -> list[float]:
    """The Darknet variance the layer stands for: raw stats, or undone via a bnfix marker."""
    s = st.s if st.s != 0 else 1.0
    if marker is not None:
        return sem.original_variance(st.var, s, marker.formula, marker.eps)
    return [v / s for v in st.var]


def _plan_patch(g: _Group, opts: Options, model_path: Path) -> LayerPlan:
    test_layers = [l for l in g.proto if l.runs_at_test] or g.proto
    eps_written = test_layers[0].eps
    eps_before = CAFFE_DEFAULT_EPS if eps_written is None else eps_written
    first = g.model[0]
    channels = first.blobs[0].count if first.blobs else 0
    base = LayerReport(g.name, channels, SKIPPED, eps_before=eps_before, eps_after=eps_before)
    problem = layout_problem(first)
    if problem:
        return LayerPlan(SKIPPED, [], [], lambda: (base._replace(reason=problem, warning=True), {}))
    s = first.blobs[2].first()
    check_scale(s, g.name, model_path)
    decision = decide(eps_written, s, g.marker, opts)
    if decision.status == UP_TO_DATE:
        # The original statistics are gone; measured against the variance recovered from the
        # patched one the error would be ~0 by construction, so none is claimed.
        report = base._replace(status=UP_TO_DATE, reason=decision.reason, err_before=None, err_after=None)
        return LayerPlan(UP_TO_DATE, [], [], lambda: (report, {}))
    if decision.status != PATCHED:
        return LayerPlan(decision.status, [], [], lambda: (_skipped_report(base, decision, first, g.marker, opts), {}))

    changes = ["variance recomputed"]
    edits = [_model_edit(bn, opts) for bn in checked_entries(g, model_path)]
    if any(e.fix_scale for e in edits):
        changes.append("scale factor fixed (s=0 → 1)")
    splices = _prototxt_edits(g, opts, eps_written, changes, edits[0].undo)
    layout = [(e.bn.layer.start, e.bn.layer.end, e.size) for e in edits]

    def finish() -> tuple[LayerReport, Entries]:
        entries: Entries = {}
        reports = [_apply(e, g, opts, eps_before, model_path, entries) for e in edits]
        return reports[0]._replace(name=g.name, changes=tuple(dict.fromkeys(changes))), entries

    return LayerPlan(PATCHED, splices, layout, finish)


def _skipped_report(base: LayerReport, decision: Decision, bn, marker, opts: Options) -> LayerReport:
    """The errors of a layer left alone, as they are (its statistics may hold anything)."""
    st = stats_of(bn)
    err = sem.denominator_error(st.var, st.s, base.eps_before, reference_variance(st, marker), opts.source)
    value, channel = sem.worst(err)
    return base._replace(status=decision.status, reason=decision.reason, warning=decision.warning,
                   err_before=value, err_after=value, worst_channel=channel)


class _ModelEdit(namedtuple("_ModelEdit", "bn param fix_scale undo size")):
    """One caffemodel entry to rewrite: its new batch_norm_param payload now, its variance
    later; ``size`` is the rewritten entry's length (blob values change in place)."""

    __slots__ = ()


def _model_edit(bn: caffemodel.BatchNormLayer, opts: Options) -> _ModelEdit:
    """The stored param gets eps (and use_global_stats true where it said false), edited at the
    wire level so every other byte stays; the marker records what to put back."""
    undo: list[tuple[str, str]] = []
    fix_scale = bn.blobs[2].first() == 0
    if fix_scale:
        undo.append(("s", "0"))
    stored = bn.stored_param()
    ugs = ...
    if stored is None:
        undo.append(("model", "none"))
    else:
        undo.append(("model.eps", "none" if stored.eps is None else repr(stored.eps)))
        if stored.use_global_stats is False:
            ugs = True
            undo.append(("model.ugs", "false"))
    param = bn.edited_param(eps=f32(opts.target_eps), use_global_stats=ugs)
    return _ModelEdit(bn, param, fix_scale, undo, len(bn.rebuilt({}, param)))


def _apply(edit: _ModelEdit, g: _Group, opts: Options, eps_before: float, model_path: Path,
           entries: Entries) -> LayerReport:
    """Refit one entry's variance, encode it, and verify from the encoded bytes."""
    bn = edit.bn
    st = stats_of(bn)
    _check_values(st, g.name, model_path)
    target = sem.darknet_denominator(reference_variance(st, g.marker), opts.source)
    err_before = sem.relative_error(sem.caffe_denominator(st.var, st.s, eps_before), target)
    blob_values = {}
    s = st.s
    if edit.fix_scale:
        s = 1.0
        blob_values[2] = [1.0]
    blob_values[1] = sem.stored_variance(target, s, opts.target_eps)
    entry = bn.rebuilt(blob_values, edit.param)
    entries[bn.layer.start] = entry

    # Verify from the bytes just encoded, not from the float64 intent.
    written = caffemodel.decode_batch_norm(bn.layer, caffemodel.payload_of(entry))
    wst = stats_of(written)
    stored = written.param()  # decoded by the protobuf runtime: an independent reading
    if stored.eps != f32(opts.target_eps) or (stored.HasField("use_global_stats") and not stored.use_global_stats):
        raise AssertionError(f"internal error: layer {g.name!r}: the encoded batch_norm_param reads back wrong")
    err_after = sem.relative_error(sem.caffe_denominator(wst.var, wst.s, stored.eps), target)
    if not all(map(math.isfinite, err_after)):
        raise BnfixError(f"{model_path}: layer {g.name!r}: patched denominator is not finite; refusing to write")
    after, channel = sem.worst(err_after)
    return LayerReport(
        bn.layer.name, len(st.var), PATCHED, eps_before=eps_before, eps_after=f32(opts.target_eps),
        max_rel_var_change=sem.max_relative_change(st.var, wst.var),
        negative_channels=sum(1 for v in wst.var if v < 0),
        err_before=sem.worst(err_before)[0], err_after=after, worst_channel=channel,
    )


def _prototxt_edits(g: _Group, opts: Options, eps_written, changes: list[str], model_undo) -> list[prototxt.Splice]:
    """eps, use_global_stats and the marker, in every prototxt entry of this name."""
    splices: list[prototxt.Splice] = []
    eps_text = repr(float(opts.target_eps))
    for layer in g.proto:
        doc = layer.doc
        undo: list[tuple[str, str]] = []
        old_marker = find_marker(layer)
        eps_field = layer.bn_field("eps")
        param = layer.bn_param
        if old_marker is not None:  # re-patch: keep what the first patch replaced
            undo = list(old_marker[0].undo)
        if eps_field is not None:
            if doc.scalar(eps_field) != eps_text:
                splices.append(layer.set_value(eps_field, eps_text))
            if old_marker is None:
                undo.append(("eps", doc.scalar(eps_field)))
        elif param is not None:
            splices.append(layer.add_field(param.value, f"eps: {eps_text}"))
            undo.append(("eps", "none"))
        else:
            unit = layer.block_indent()
            splices.append(layer.add_field(layer.body, f"batch_norm_param {{\n{unit}eps: {eps_text}\n}}"))
            undo.append(("eps", "block"))
        ugs = layer.bn_field("use_global_stats")
        if ugs is not None and layer.use_global_stats is False and layer.runs_at_test:
            splices.append(layer.set_value(ugs, "true"))
            undo.append(("ugs", "false"))
            changes.append("use_global_stats fixed")
        if old_marker is None:
            undo += model_undo
        marker = Marker(opts.source, float(opts.target_eps), tuple(undo)).render()
        if old_marker is not None:
            splices.append(prototxt.Splice(old_marker[1], old_marker[2], marker))
        else:
            at = doc.line_end(layer.field.start)
            splices.append(prototxt.Splice(at, at, marker, order=-1))  # before a field inserted there
    if not same_eps(eps_written if eps_written is not None else CAFFE_DEFAULT_EPS, opts.target_eps):
        changes.append("eps set")
    return splices


def _verify_prototxt(doc: prototxt.Document, splices: list[prototxt.Splice], groups) -> None:
    """Every edit lies on the lines of a BatchNorm layer, and each edited stretch of lines still
    parses to the same layers.  Text outside those lines is copied untouched, so this proves the
    whole file without re-parsing all of it."""
    regions: list[list] = []  # [first offset, last offset, layers]; layers sharing a line merge
    for layer in sorted((l for g in groups for l in g.proto), key=lambda l: l.field.start):
        a, b = doc.line_start(layer.field.start), doc.line_end(layer.field.end)
        if regions and a <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], b)
            regions[-1][2].append(layer)
        else:
            regions.append([a, b, [layer]])
    todo = sorted(splices, key=lambda sp: sp.start)
    for a, b, layers in regions:
        inside = [sp for sp in todo if a <= sp.start and sp.end <= b]
        if not inside:
            continue
        todo = [sp for sp in todo if not (a <= sp.start and sp.end <= b)]
        after = prototxt.parse(doc.render(inside, a, b), doc.path).layers()
        others = [l for l in doc.layers() if a <= l.field.start <= b] if len(after) != len(layers) else layers
        if [(l.name, l.type) for l in others] != [(l.name, l.type) for l in after]:
            raise AssertionError(f"internal error: the edit at {doc.where(a)} changed the layers")
    if todo:
        raise AssertionError(f"internal error: edit outside a BatchNorm layer at {doc.where(todo[0].start)}")
