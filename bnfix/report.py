"""The diff summary, rendered: a rich table per pair, one line per pair, JSON, and totals.

Every renderer is pure (it builds a value and never prints) and reads the same records, so the
table, the line and the JSON cannot drift apart; ``FIELDS`` is the list they are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .result import LayerReport, Mode, Status

if TYPE_CHECKING:
    from rich.console import RenderableType

    from .crosscheck import CrossCheck
    from .pipeline import Deviation, Result

FIELDS = tuple(LayerReport._fields)
LONG_TABLE = 40  # rows; a longer table lists the worst layers first


def _finite(x: float | None) -> float | None:
    """JSON has no inf/NaN."""
    return x if x is not None and math.isfinite(x) else None


def layer_dict(r: LayerReport) -> dict[str, Any]:
    d = r._asdict()
    d["status"] = r.status.value
    d["strategy"] = None if r.strategy is None else r.strategy.value
    d["changes"] = list(r.changes)
    for k in ("max_rel_change", "err_before", "err_after"):
        d[k] = _finite(d[k])
    return d


class Totals:
    """Counts over every pair of a run; grows by one pair at a time (memory stays flat)."""

    KEYS = ("pairs", "layers", "patched", "reverted", "skipped", "up_to_date", "channels", "negative_channels")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.err_before: float | None = None
        self.err_after: float | None = None

    def add(self, layers: Sequence[LayerReport]) -> Totals:
        c = self.counts
        c["pairs"] += 1
        c["layers"] += len(layers)
        for status, key in ((Status.PATCHED, "patched"), (Status.REVERTED, "reverted"),
                            (Status.SKIPPED, "skipped"), (Status.UP_TO_DATE, "up_to_date")):
            c[key] += sum(l.status is status for l in layers)
        c["channels"] += sum(l.channels for l in layers)
        c["negative_channels"] += sum(l.negative_channels for l in layers)
        self.err_before = _max(self.err_before, (l.err_before for l in layers))
        self.err_after = _max(self.err_after, (l.err_after for l in layers))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts, "err_before": _finite(self.err_before), "err_after": _finite(self.err_after)}


def _max(current: float | None, values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    if current is not None:
        found.append(current)
    return max(found, default=None)


def totals(layers: Sequence[LayerReport]) -> dict[str, Any]:
    return Totals().add(layers).as_dict()


def deviation_dicts(devs: Sequence[Deviation]) -> list[dict[str, Any]]:
    return [{"runtime": d.runtime, "worst_error": _finite(d.worst), "problem": d.problem or None,
             "layers": list(d.layers)} for d in devs]


def pair_dict(result: Result) -> dict[str, Any]:
    src, opts = result.options.source, result.options
    layers = result.layers
    patch = result.mode is Mode.PATCH
    return {
        "mode": result.mode.value,
        "prototxt": str(result.prototxt),
        "caffemodel": str(result.caffemodel),
        "target": opts.target if patch else None,
        "choices": list(opts.choices) if patch else [],
        "strategy": opts.strategy.value if patch else None,
        "source": {"preset": src.preset, "formula": src.expression, "inside": src.inside,
                   "outside": src.outside} if patch else None,
        "target_eps": _target_eps(result) if patch else None,
        "force": opts.force,
        "needs_work": result.needs_work,
        "layers": [layer_dict(l) for l in layers],
        "totals": totals(layers),
        "warnings": list(result.warnings),
        "deviations": deviation_dicts(result.deviations()) if patch else [],
        "darknet": None if result.darknet is None else darknet_dict(result.darknet),
        "outputs": None if result.outputs is None else {
            "prototxt": str(result.outputs[0]), "caffemodel": str(result.outputs[1])},
    }


def _target_eps(result: Result) -> float | None:
    """The eps the run stores: the option, else the eps strategy's default (None: the scale
    strategy keeps each layer's own)."""
    from .result import DEFAULT_EPS, StrategyName

    opts = result.options
    if opts.target_eps is not None:
        return max(opts.target_eps, opts.eps_floor)
    return max(DEFAULT_EPS, opts.eps_floor) if opts.strategy is StrategyName.EPS else None


def darknet_dict(cc: CrossCheck) -> dict[str, Any]:
    h = cc.header
    return {
        "weights": str(cc.weights),
        "cfg": None if cc.cfg is None else str(cc.cfg),
        "header": {"major": h.major, "minor": h.minor, "revision": h.revision, "seen": h.seen,
                   "header_size": h.header_size},
        "writer": h.writer,
        "source_warning": cc.source_warning or None,
        "faults": cc.faults,
        "layers": [{**l._asdict(), "ok": l.ok} for l in cc.layers],
    }


# -- text ------------------------------------------------------------------------------------


def e(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "∞"
    return "0" if x == 0 else f"{x:.1e}"


def _eps(x: float) -> str:
    return f"{x:.3g}"


def summary_line(result: Result) -> str:
    t = totals(result.layers)
    if result.mode is Mode.REVERT:
        return (f"{t['reverted']} of {t['layers']} BatchNorm layers reverted ({t['channels']} channels), "
                f"{t['skipped']} without a bnfix marker; error now {e(t['err_after'])}")
    line = (f"{t['patched']} of {t['layers']} BatchNorm layers patched ({t['channels']} channels), "
            f"{t['up_to_date']} up to date, {t['skipped']} skipped; worst error "
            f"{e(t['err_before'])} → {e(t['err_after'])}")
    if t["negative_channels"]:
        line += f"; {t['negative_channels']} channel(s) store a negative variance"
    return line


def deviation_lines(devs: Sequence[Deviation]) -> list[str]:
    """Where the output is not right, runtime by runtime (nothing when it is right everywhere)."""
    out = []
    for d in devs:
        where = ", ".join(d.layers[:3]) + (" …" if len(d.layers) > 3 else "")
        what = d.problem or f"error up to {e(d.worst)}"
        out.append(f"not exact in {d.runtime}: {what} ({len(d.layers)} layer(s): {where})")
    return out


def pair_line(result: Result) -> str:
    """One line for a pair in a run over many: what was done, worst error before → after, how
    many warnings, and the runtimes where the output is not exact."""
    name = f"{result.prototxt} + {result.caffemodel.name}"
    t = totals(result.layers)
    warnings = sum(l.warning for l in result.layers) + len(result.warnings)
    if result.mode is Mode.REVERT:
        what = f"{t['reverted']} reverted"
    elif t["patched"]:
        what = f"{t['patched']} patched"
    elif t["up_to_date"] == t["layers"] and t["layers"]:
        what = "up to date"
    else:
        what = "nothing patched"
    extra = [f"{t['up_to_date']} up to date"] if t["patched"] and t["up_to_date"] else []
    if t["skipped"]:
        extra.append(f"{t['skipped']} skipped")
    if warnings:
        extra.append(f"{warnings} warning(s)")
    if result.mode is Mode.PATCH:
        devs = [d.runtime for d in result.deviations()]
        if devs:
            extra.append("not exact in " + ", ".join(devs))
    err = f"; error {e(t['err_before'])} → {e(t['err_after'])}" if t["patched"] or t["reverted"] else ""
    return f"{name}: {what} of {t['layers']} layers{err}" + (f" ({'; '.join(extra)})" if extra else "")


def run_line(t: Totals, failed: int, unpaired: int) -> str:
    c = t.counts
    line = (f"total: {c['pairs']} pair(s), {c['patched']} layers patched, {c['reverted']} reverted, "
            f"{c['up_to_date']} up to date, {c['skipped']} skipped; worst error "
            f"{e(t.err_before)} → {e(t.err_after)}; {failed} pair(s) failed")
    return line + (f", {unpaired} file(s) unpaired" if unpaired else "")


# -- the rich table --------------------------------------------------------------------------


def _status_cell(l: LayerReport) -> str:
    from rich.markup import escape

    if l.status in (Status.PATCHED, Status.REVERTED):
        note = f"; [yellow]{escape(l.reason)}[/]" if l.reason else ""
        return "[green]" + escape(", ".join(l.changes)) + "[/]" + note
    if l.status is Status.UP_TO_DATE:
        return "[dim]up to date (bnfix markers agree)[/]"
    return f"[yellow]skipped: {escape(l.reason)}[/]" if l.warning else f"skipped: {escape(l.reason)}"


def _error_cell(l: LayerReport) -> str:
    if l.status not in (Status.PATCHED, Status.REVERTED):
        return e(l.err_before)
    colour = "green" if l.err_after is not None and l.err_after <= 1e-6 else "yellow"
    return f"{e(l.err_before)} → [{colour}]{e(l.err_after)}[/]"


def ordered(layers: Sequence[LayerReport]) -> list[LayerReport]:
    """The table's rows: file order, or for a long table the worst first (warnings, then the
    largest remaining error, then the largest error before)."""
    if len(layers) <= LONG_TABLE:
        return list(layers)
    return sorted(layers, key=lambda l: (not l.warning, -(l.err_after or 0.0), -(l.err_before or 0.0)))


def table(result: Result) -> RenderableType:
    """One row per BatchNorm layer, then totals, warnings and output paths."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    src = result.options.source
    if result.mode is Mode.REVERT:
        how = "reverting bnfix patches (formula and eps read from each layer's markers)"
    else:
        how = f"Darknet formula assumed: [cyan]D = {escape(str(src))}[/]; " + escape("; ".join(result.options.choices))
    pair = f"[bold]{escape(str(result.prototxt))}[/] + [bold]{escape(str(result.caffemodel))}[/]"
    title = Text.from_markup(f"{pair}\n{how}")
    t = Table(show_lines=False, header_style="bold", expand=False)
    t.add_column("layer", overflow="fold")
    t.add_column("ch", justify="right")
    t.add_column("eps", no_wrap=True)
    t.add_column("what changed", overflow="fold", ratio=1)
    t.add_column("max Δ/stat", justify="right")
    t.add_column("var<0", justify="right")
    t.add_column("rel. error", justify="right", no_wrap=True)
    layers = result.layers
    for l in ordered(layers):
        eps = _eps(l.eps_before) if l.eps_after == l.eps_before else f"{_eps(l.eps_before)} → {_eps(l.eps_after)}"
        neg = f"[yellow]{l.negative_channels}[/]" if l.negative_channels else "0"
        change = e(l.max_rel_change) if l.status in (Status.PATCHED, Status.REVERTED) else "-"
        t.add_row(escape(l.name), str(l.channels), eps, _status_cell(l), change, neg, _error_cell(l))
    parts: list[RenderableType] = [title, t]
    if len(layers) > LONG_TABLE:
        parts.append(Text("(worst layers first)"))
    parts.append(Text(summary_line(result)))
    for w in result.warnings:
        parts.append(Text.from_markup(f"[yellow]warning:[/] {escape(w)}"))
    if result.mode is Mode.PATCH:
        for line in deviation_lines(result.deviations()):
            parts.append(Text.from_markup(f"[yellow]note:[/] {escape(line)}"))
    if any(l.negative_channels for l in layers):
        parts.append(Text.from_markup(
            "[yellow]note:[/] a negative stored variance is valid for Caffe (var/s + eps stays > 0), "
            "but float32 cancellation limits its precision; --strategy scale (or --target opencv/ncnn/"
            "mnn/openvino/portable) folds the correction into the Scale layer instead and stores none."))
    if result.darknet is not None:
        parts += darknet_section(result.darknet)
    if result.outputs:
        parts.append(Text(f"wrote {result.outputs[0]}\nwrote {result.outputs[1]}"))
    return Group(*parts)


def darknet_section(cc: CrossCheck) -> list[RenderableType]:
    """The cross-check against the Darknet originals: writer, source fit, per-layer faults."""
    from collections import Counter

    from rich.table import Table
    from rich.text import Text

    h = cc.header
    lines = [f"Darknet originals: {cc.weights} is version {h.version} ({h.writer}), "
             f"{h.header_size}-byte header, seen {h.seen}"]
    if cc.cfg is not None:
        counts = Counter(l.status for l in cc.layers)
        matched = sum(l.ok for l in cc.layers)
        detail = ", ".join(f"{n} {k}" for k, n in counts.items())
        colour = "green" if not cc.faults else "red"
        lines.append(f"{cc.cfg}: [{colour}]{matched} of {len(cc.layers)} BatchNorm layers match Darknet's "
                     f"statistics[/] ({detail})")
    out: list[RenderableType] = [Text.from_markup("\n".join(lines))]
    if cc.source_warning:
        out.append(Text.from_markup(f"[yellow]warning:[/] {cc.source_warning}"))
    faulty = [l for l in cc.layers if not l.ok]
    if faulty:
        t = Table(title="converter faults", header_style="bold")
        for col in ("caffe layer", "darknet layer", "ch", "status", "max |Δmean|", "max Δvar/var", "note"):
            t.add_column(col)
        for l in faulty:
            t.add_row(l.caffe or "-", "-" if l.darknet_index is None else f"{l.darknet_index} (line {l.darknet_line})",
                      str(l.channels), f"[red]{l.status}[/]", e(l.max_abs_mean), e(l.max_rel_var), l.note)
        out.append(t)
    return out
