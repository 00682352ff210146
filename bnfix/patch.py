"""Plan and apply the fix: pair BatchNorm layers by name, decide per layer, edit both files.

Flow: ``read`` both inputs → ``plan`` one :class:`Decision` per layer name (pure) → ``apply``
(prototxt splices + re-encoded caffemodel layers, in memory) → ``verify`` (re-decode the new
bytes and recompute Caffe's float32 denominator) → a :class:`Result` the CLI renders and saves.

How bnfix knows a layer is already patched: it appends a marker comment to the line that opens
the layer in the prototxt, ``layer {  # bnfix: fitted to sqrt(var) + 1e-06, eps 1e-06 [undo
eps=none]``.  The marker names the formula and eps used and what the patch replaced, so a
re-patch (``force``) or a revert can recover the original statistics exactly.  The stored eps
alone cannot tell: a converter may have written ``eps: 1e-06`` without refitting the variance.
So a layer whose eps already equals the target but has no marker is skipped with a warning
(patch it with ``force``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import atomic, caffemodel, prototxt
from . import semantics as sem
from .errors import BnfixError

CAFFE_DEFAULT_EPS = 1e-5

# -- the marker ------------------------------------------------------------------------------

_MARKER = re.compile(r"  # bnfix: fitted to (?P<expr>[^,\]]+), eps (?P<eps>\S+) \[undo(?P<undo>[^\]]*)\]")


@dataclass(frozen=True)
class Marker:
    """What a bnfix patch wrote into a layer and what it replaced (for revert / re-patch)."""

    formula: sem.Formula
    eps: float
    undo: tuple[tuple[str, str], ...]  # e.g. (("eps", "none"), ("ugs", "false"), ("s", "0"))

    def render(self) -> str:
        undo = "".join(f" {k}={v}" for k, v in self.undo)
        return f"  # bnfix: fitted to {self.formula.expression}, eps {self.eps!r} [undo{undo}]"

    def get(self, key: str) -> str | None:
        return dict(self.undo).get(key)


def find_marker(layer: prototxt.Layer) -> tuple[Marker, int, int] | None:
    """The marker on the layer's opening line and its span, if bnfix patched it."""
    doc = layer.doc
    line_start = doc.line_start(layer.field.start)
    for tok in doc.comments_between(line_start, doc.line_end(layer.field.start)):
        text = doc.text[tok.start - 2 : tok.end] if doc.text[tok.start - 2 : tok.start] == "  " else ""
        m = _MARKER.search(doc.text, tok.start - 2 if text else tok.start, tok.end)
        if m:
            try:
                formula = sem.parse_source(m["expr"])
                eps = float(m["eps"])
            except ValueError:
                raise doc.error(tok.start, f"layer {layer.name!r}: unreadable bnfix marker") from None
            undo = tuple(tuple(kv.split("=", 1)) for kv in m["undo"].split() if "=" in kv)
            return Marker(formula, eps, undo), m.start(), m.end()
    return None


# -- options and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the patched model must reproduce, and how hard to push."""

    source: sem.Formula = sem.PRESETS[sem.DEFAULT_SOURCE]
    target_eps: float = 1e-6
    force: bool = False

    def __post_init__(self):
        if not (self.target_eps >= 0 and np.isfinite(self.target_eps)):
            raise BnfixError(f"target eps must be a finite number >= 0, not {self.target_eps!r}")


PATCHED, SKIPPED, UP_TO_DATE = "patched", "skipped", "up to date"


@dataclass(frozen=True)
class LayerReport:
    """One BatchNorm layer's row of the diff summary (every number from the written bytes)."""

    name: str
    channels: int
    status: str  # PATCHED, SKIPPED (reason says why) or UP_TO_DATE (patched by bnfix before)
    changes: tuple[str, ...] = ()
    reason: str = ""
    warning: bool = False
    eps_before: float = CAFFE_DEFAULT_EPS
    eps_after: float = CAFFE_DEFAULT_EPS
    max_rel_var_change: float = 0.0
    negative_channels: int = 0
    err_before: float | None = 0.0  # max relative error of Caffe's denominator vs Darknet's
    err_after: float | None = 0.0  # None when unknown (layer patched by an earlier run)
    worst_channel: int = 0


@dataclass
class Result:
    """The outcome of :func:`patch`: per-layer reports and the new file contents, not yet saved."""

    prototxt: Path
    caffemodel: Path
    options: Options
    layers: list[LayerReport]
    warnings: list[str]
    new_prototxt: str
    original_prototxt: str
    _replacements: dict[int, tuple[int, int, bytes]]
    _model_size: int
    _model_mtime: int
    outputs: tuple[Path, Path] | None = None
    mode: str = "patch"  # or "revert"
    darknet: object | None = None  # a crosscheck.CrossCheck when the Darknet originals were given

    @property
    def needs_work(self) -> bool:
        """Whether a write would change a layer (what ``--check`` reports)."""
        return any(r.status in (PATCHED, "reverted") for r in self.layers)

    @property
    def changed(self) -> bool:
        return bool(self._replacements) or self.new_prototxt != self.original_prototxt

    def save(self, prototxt_out: str | Path, caffemodel_out: str | Path, *, backup: bool = False,
             sync: bool = True, progress=None) -> None:
        """Write both outputs atomically (temp file, fsync, rename); all or nothing.

        ``backup`` keeps ``<output>.orig`` copies of files about to be replaced (for in-place);
        ``sync=False`` skips the fsyncs (see :func:`bnfix.atomic.write_all`).
        """
        outs = (Path(prototxt_out), Path(caffemodel_out))
        for out, src in zip(outs, (self.prototxt, self.caffemodel)):
            if out.exists() and src.exists() and out.samefile(src) and not backup:
                raise BnfixError(f"{out}: output would overwrite its input (use --in-place to mean that)")
        text = self.new_prototxt.encode("utf-8")

        def write_model(fd: int) -> None:
            caffemodel.write(self.caffemodel, self._model_size, self._replacements, fd, progress)

        if Path(self.caffemodel).stat().st_mtime_ns != self._model_mtime:
            raise BnfixError(f"{self.caffemodel}: the file changed while bnfix was running")
        atomic.write_all([(outs[0], lambda fd: caffemodel._write_all(fd, text)), (outs[1], write_model)],
                         backup=backup, sync=sync)
        self.outputs = outs


# -- reading and planning --------------------------------------------------------------------


@dataclass
class _Group:
    """All entries of one BatchNorm name: prototxt layers (phase-split duplicates) and model layers."""

    name: str
    proto: list[prototxt.Layer]
    model: list[caffemodel.BatchNormLayer]
    marker: Marker | None = None


@dataclass(frozen=True)
class Decision:
    status: str
    reason: str = ""
    warning: bool = False


def decide(eps_written: float | None, s: float, marker: Marker | None, opts: Options) -> Decision:
    """Whether to patch one layer, from what the files say (pure; the heart of "never double-correct")."""
    if marker is not None:
        same = (marker.formula.inside, marker.formula.outside) == (opts.source.inside, opts.source.outside)
        if same and sem.same_eps(marker.eps, opts.target_eps):
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
    if eps_written is not None and sem.same_eps(eps_written, opts.target_eps) and not opts.force:
        return Decision(SKIPPED, f"eps is already {opts.target_eps!r} but there is no bnfix marker: the "
                        "converter may have set eps without refitting the variance (--force to patch)",
                        warning=True)
    return Decision(PATCHED)


def patch(prototxt_path: str | Path, caffemodel_path: str | Path, options: Options | None = None, **kw) -> Result:
    """Read a converted pair and compute the patched files in memory (nothing is written).

    ``options`` or keyword arguments ``source`` (a preset name, a ``sqrt(var+A)+B`` string or a
    :class:`~bnfix.semantics.Formula`), ``target_eps`` and ``force``.  Call ``result.save(...)``
    to write the outputs.
    """
    if options is None:
        if isinstance(kw.get("source"), str):
            try:
                kw["source"] = sem.parse_source(kw["source"])
            except ValueError as exc:
                raise BnfixError(str(exc)) from None
        options = Options(**kw)
    elif kw:
        raise TypeError("give either options or keyword arguments, not both")
    return run(prototxt_path, caffemodel_path, options, lambda g, mp: _patch_group(g, options, mp))


def run(prototxt_path, caffemodel_path, options: Options, per_layer, mode: str = "patch") -> Result:
    """Read both files, pair their BatchNorm layers, apply ``per_layer`` to each, verify.

    ``per_layer(group, caffemodel_path)`` returns ``(LayerReport, prototxt splices,
    {layer index: (start, end, new entry bytes)})``; patch and revert differ only there.
    """
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
        reports, splices, replacements = [], [], {}
        for g in groups:
            rep, sp, rp = per_layer(g, mp)
            reports.append(rep)
            splices += sp
            replacements.update(rp)
        size, mtime = model.size, model.mtime_ns
    _verify_prototxt(doc, splices, groups)
    new_text = doc.render(splices)
    return Result(pp, mp, options, reports, warnings, new_text, doc.text, replacements, size, mtime, mode=mode)


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
        layer.eps  # parse errors surface here, naming the line
        layer.use_global_stats
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


@dataclass(frozen=True)
class _Stats:
    """A caffemodel BatchNorm layer's statistics, in the layout bnfix understands."""

    mean: np.ndarray
    var: np.ndarray  # as stored (blob 1)
    s: float


def stats_of(bn: caffemodel.BatchNormLayer) -> _Stats | str:
    """The three BVLC blobs (also the first three of NVCaffe's 5), or why they are not usable."""
    b = bn.blobs
    if len(b) not in (3, 5):
        return f"{len(b)} blobs: not the 3-blob BVLC or 5-blob NVCaffe layout" if b else "no statistics stored"
    if b[2].count != 1 or b[0].count != b[1].count:
        return "blob sizes do not match mean/variance/scale-factor (NVCaffe 0.14/0.15 order?)"
    return _Stats(b[0].values, b[1].values, float(b[2].values[0]))


def _check_scale(stats: _Stats, name: str, path: Path) -> None:
    """A negative or non-finite scale factor is corruption, whatever else happens to the layer."""
    if not np.isfinite(stats.s) or stats.s < 0:
        raise BnfixError(f"{path}: layer {name!r}: scale factor (blob 2) is {float(stats.s)!r}")


def _check(stats: _Stats, name: str, path: Path) -> None:
    """Statistics about to be refitted must be numbers, and the variance not negative."""
    _check_scale(stats, name, path)
    for what, values, neg in (("variance", stats.var, False), ("mean", stats.mean, True)):
        ch = sem.bad_channel(values, allow_negative=neg)
        if ch is not None:
            raise BnfixError(f"{path}: layer {name!r} channel {ch}: {what} is {float(values[ch])!r}; "
                             "refusing to patch corrupt statistics")


def _max_or_none(err: np.ndarray) -> float | None:
    """The worst error, or None when a skipped layer's own statistics make it undefined."""
    worst = float(err.max(initial=0))
    return worst if np.isfinite(worst) else None


def _patch_group(g: _Group, opts: Options, model_path: Path):
    test_layers = [l for l in g.proto if l.runs_at_test] or g.proto
    eps_written = test_layers[0].eps
    eps_before = CAFFE_DEFAULT_EPS if eps_written is None else eps_written
    first = g.model[0]
    stats = stats_of(first)
    channels = first.blobs[0].count if first.blobs else 0
    if isinstance(stats, str):
        return LayerReport(g.name, channels, SKIPPED, reason=stats, warning=True,
                           eps_before=eps_before, eps_after=eps_before), [], {}
    _check_scale(stats, g.name, model_path)
    decision = decide(eps_written, stats.s, g.marker, opts)
    if decision.status == UP_TO_DATE:
        # The original statistics are gone; measured against the variance recovered from the
        # patched one the error would be ~0 by construction, so none is claimed.
        return LayerReport(g.name, channels, UP_TO_DATE, reason=decision.reason, eps_before=eps_before,
                           eps_after=eps_before, err_before=None, err_after=None), [], {}
    if decision.status != PATCHED:
        with np.errstate(all="ignore"):  # a skipped layer may hold anything; it is not refused
            ref = _reference_variance(stats, g.marker)
            err = sem.denominator_error(stats.var, stats.s, eps_before, ref, opts.source)
        worst = _max_or_none(err)
        return LayerReport(g.name, channels, decision.status, reason=decision.reason, warning=decision.warning,
                           eps_before=eps_before, eps_after=eps_before, err_before=worst, err_after=worst,
                           worst_channel=_argmax(np.nan_to_num(err, nan=np.inf))), [], {}

    changes: list[str] = []
    replacements: dict[int, tuple[int, int, bytes]] = {}
    reports = []
    for bn in g.model:
        st = stats_of(bn)
        if isinstance(st, str):
            raise BnfixError(f"{bn.layer.name!r}: duplicate entries in the caffemodel disagree: {st}")
        _check(st, g.name, model_path)
        reports.append(_patch_model_layer(bn, st, g.marker, opts, eps_before, replacements, changes))
    splices = _prototxt_edits(g, opts, eps_written, changes, reports[0][1])
    rep = reports[0][0]
    return replace(rep, name=g.name, changes=tuple(dict.fromkeys(changes))), splices, replacements


def _reference_variance(st: _Stats, marker: Marker | None) -> np.ndarray:
    """The Darknet variance the layer stands for: raw stats, or undone via a bnfix marker."""
    s = st.s if st.s != 0 else 1.0
    if marker is not None:
        return sem.original_variance(st.var, s, marker.formula, marker.eps)
    return np.asarray(st.var, np.float64) / s


def _argmax(a: np.ndarray) -> int:
    return int(np.argmax(a)) if a.size else 0


def _patch_model_layer(bn, st: _Stats, marker, opts: Options, eps_before, replacements, changes):
    """New variance (and scale factor, and stored param) for one caffemodel entry; verified."""
    ref = _reference_variance(st, marker)
    err_before = sem.denominator_error(st.var, st.s, eps_before, ref, opts.source)
    s = st.s
    blob_values: dict[int, np.ndarray] = {}
    undo: list[tuple[str, str]] = []
    if s == 0:
        s = 1.0
        blob_values[2] = np.ones(1, bn.blobs[2].values.dtype)
        changes.append("scale factor fixed (s=0 → 1)")
        undo.append(("s", "0"))
    new_var = sem.patched_variance(ref, s, opts.source, opts.target_eps)
    blob_values[1] = new_var.astype(bn.blobs[1].values.dtype)
    changes.insert(0, "variance recomputed")

    param = bn.param()
    if param is None:
        undo.append(("model", "none"))
        param = caffemodel.bn_param_class()()
    else:
        undo.append(("model.eps", repr(float(param.eps)) if param.HasField("eps") else "none"))
        if param.HasField("use_global_stats") and not param.use_global_stats:
            param.use_global_stats = True
            undo.append(("model.ugs", "false"))
    param.eps = opts.target_eps
    entry = bn.rebuilt(blob_values, param)
    replacements[bn.layer.index] = (bn.layer.start, bn.layer.end, entry)

    # Verify from the bytes just encoded, not from the float64 intent.
    written = caffemodel.decode_batch_norm(bn.layer, caffemodel.payload_of(entry))
    wst = stats_of(written)
    assert not isinstance(wst, str)
    stored_eps = float(written.param().eps)
    err_after = sem.denominator_error(wst.var, wst.s, stored_eps, ref, opts.source)
    if not np.all(np.isfinite(err_after)):
        raise BnfixError(f"layer {bn.layer.name!r}: patched denominator is not finite; refusing to write")
    report = LayerReport(
        bn.layer.name, st.var.size, PATCHED, eps_before=eps_before, eps_after=sem.f32(opts.target_eps),
        max_rel_var_change=sem.max_relative_change(st.var, wst.var),
        negative_channels=int((wst.var < 0).sum()),
        err_before=float(err_before.max(initial=0)), err_after=float(err_after.max(initial=0)),
        worst_channel=_argmax(err_after),
    )
    return report, undo



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
    if not sem.same_eps(eps_written if eps_written is not None else CAFFE_DEFAULT_EPS, opts.target_eps):
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
