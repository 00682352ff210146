"""The diff summary: one result rendered as a rich table and as a JSON-able dict.

Both renderers are pure (they build objects and never print) and read the same fields, so the
table and the JSON cannot drift apart; ``FIELDS`` is the list both are tested against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import __version__
from .patch import PATCHED, REVERTED, SKIPPED, UP_TO_DATE, LayerReport, Result

if TYPE_CHECKING:
    from rich.console import RenderableType

FIELDS = (
    "name", "channels", "status", "changes", "reason", "warning", "eps_before", "eps_after",
    "max_rel_var_change", "negative_channels", "err_before", "err_after", "worst_channel",
)


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN; a relative change from an exact 0 becomes null."""
    return x if math.isfinite(x) else None


def layer_dict(r: LayerReport) -> dict:
    d = r._asdict()
    d["changes"] = list(r.changes)
    d["max_rel_var_change"] = _finite(r.max_rel_var_change)
    return d


def totals(results: list[Result]) -> dict:
    layers = [l for r in results for l in r.layers]
    return {
        "pairs": len(results),
        "layers": len(layers),
        "patched": sum(l.status == PATCHED for l in layers),
        "reverted": sum(l.status == REVERTED for l in layers),
        "skipped": sum(l.status == SKIPPED for l in layers),
        "up_to_date": sum(l.status == UP_TO_DATE for l in layers),
        "channels": sum(l.channels for l in layers),
        "negative_channels": sum(l.negative_channels for l in layers),
        "err_before": max((l.err_before for l in layers if l.err_before is not None), default=None),
        "err_after": max((l.err_after for l in layers if l.err_after is not None), default=None),
    }


def pair_dict(result: Result) -> dict:
    src = result.options.source
    return {
        "mode": result.mode,
        "prototxt": str(result.prototxt),
        "caffemodel": str(result.caffemodel),
        "source": {"preset": src.preset, "formula": src.expression, "inside": src.inside, "outside": src.outside},
        "target_eps": result.options.target_eps,
        "force": result.options.force,
        "layers": [layer_dict(l) for l in result.layers],
        "totals": totals([result]),
        "warnings": list(result.warnings),
        "darknet": None if result.darknet is None else darknet_dict(result.darknet),
        "outputs": None if result.outputs is None else {
            "prototxt": str(result.outputs[0]), "caffemodel": str(result.outputs[1])},
    }


def darknet_dict(cc) -> dict:
    from dataclasses import asdict

    h = cc.header
    return {
        "weights": str(cc.weights),
        "cfg": None if cc.cfg is None else str(cc.cfg),
        "header": {"major": h.major, "minor": h.minor, "revision": h.revision, "seen": h.seen,
                   "header_size": h.header_size},
        "writer": h.writer,
        "source_warning": cc.source_warning or None,
        "faults": cc.faults,
        "layers": [asdict(l) | {"ok": l.ok} for l in cc.layers],
    }


def to_json(results: list[Result], errors: list[dict] | None = None) -> dict:
    """The whole run: one entry per pair (with one object per layer), errors, and totals."""
    return {
        "bnfix": __version__,
        "pairs": [pair_dict(r) for r in results],
        "errors": list(errors or []),
        "totals": totals(results),
    }


# -- the rich table --------------------------------------------------------------------------


def _e(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "∞"
    return "0" if x == 0 else f"{x:.1e}"


def _eps(x: float) -> str:
    return f"{x:.3g}"


def _status_cell(l: LayerReport) -> str:
    if l.status in (PATCHED, REVERTED):
        note = f"; [yellow]{l.reason}[/]" if l.reason else ""
        return "[green]" + ", ".join(l.changes) + "[/]" + note
    if l.status == UP_TO_DATE:
        return "[dim]up to date (bnfix marker)[/]"
    return f"[yellow]skipped: {l.reason}[/]" if l.warning else f"skipped: {l.reason}"


def _error_cell(l: LayerReport) -> str:
    if l.status not in (PATCHED, REVERTED):
        return _e(l.err_before)
    colour = "green" if l.err_after is not None and l.err_after <= 1e-6 else "yellow"
    return f"{_e(l.err_before)} → [{colour}]{_e(l.err_after)}[/]"


def table(result: Result) -> RenderableType:
    """One row per BatchNorm layer, then totals and output paths, as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    src = result.options.source
    if result.mode == "revert":
        how = "reverting bnfix patches (formula and eps read from each layer's marker)"
    else:
        how = (f"Darknet formula assumed: [cyan]D = {src}[/]; Caffe: sqrt(var/s + eps), eps → "
               f"{result.options.target_eps!r}")
    title = Text.from_markup(f"[bold]{result.prototxt}[/] + [bold]{result.caffemodel}[/]\n{how}")
    t = Table(show_lines=False, header_style="bold", expand=False)
    t.add_column("layer", overflow="fold")
    t.add_column("ch", justify="right")
    t.add_column("eps", no_wrap=True)
    t.add_column("what changed", overflow="fold", ratio=1)
    t.add_column("max Δvar/var", justify="right")
    t.add_column("var<0", justify="right")
    t.add_column("denominator rel. error", justify="right", no_wrap=True)
    for l in result.layers:
        eps = _eps(l.eps_before) if l.eps_after == l.eps_before else f"{_eps(l.eps_before)} → {_eps(l.eps_after)}"
        neg = f"[yellow]{l.negative_channels}[/]" if l.negative_channels else "0"
        t.add_row(l.name, str(l.channels), eps, _status_cell(l),
                  _e(l.max_rel_var_change) if l.status in (PATCHED, REVERTED) else "-", neg, _error_cell(l))
    parts: list = [title, t, Text.from_markup(summary_line(result))]
    for w in result.warnings:
        parts.append(Text.from_markup(f"[yellow]warning:[/] {w}"))
    if any(l.negative_channels for l in result.layers):
        parts.append(Text.from_markup(
            "[yellow]note:[/] a negative stored variance is valid for Caffe (var/s + eps stays > 0), "
            "but BN-folding scripts that take sqrt(var) will produce NaN on those channels, and float32 "
            "cancellation limits their precision; --target-eps 0 stores D² exactly where the runtime "
            "accepts eps 0 (BVLC Caffe, OpenCV)."))
    if result.darknet is not None:
        parts += darknet_section(result.darknet)
    if result.outputs:
        parts.append(Text(f"wrote {result.outputs[0]}\nwrote {result.outputs[1]}"))
    return Group(*parts)


def darknet_section(cc) -> list:
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
    out: list = [Text.from_markup("\n".join(lines))]
    if cc.source_warning:
        out.append(Text.from_markup(f"[yellow]warning:[/] {cc.source_warning}"))
    faulty = [l for l in cc.layers if not l.ok]
    if faulty:
        t = Table(title="converter faults", header_style="bold")
        for col in ("caffe layer", "darknet layer", "ch", "status", "max |Δmean|", "max Δvar/var", "note"):
            t.add_column(col)
        for l in faulty:
            t.add_row(l.caffe or "-", "-" if l.darknet_index is None else f"{l.darknet_index} (line {l.darknet_line})",
                      str(l.channels), f"[red]{l.status}[/]", _e(l.max_abs_mean), _e(l.max_rel_var), l.note)
        out.append(t)
    return out


def summary_line(result: Result) -> str:
    t = totals([result])
    if result.mode == "revert":
        return (f"{t['reverted']} of {t['layers']} BatchNorm layers reverted ({t['channels']} channels), "
                f"{t['skipped']} without a bnfix marker; denominator error now {_e(t['err_after'])}")
    line = (f"{t['patched']} of {t['layers']} BatchNorm layers patched ({t['channels']} channels), "
            f"{t['up_to_date']} up to date, {t['skipped']} skipped; worst denominator error "
            f"{_e(t['err_before'])} → {_e(t['err_after'])}")
    if t["negative_channels"]:
        line += f"; {t['negative_channels']} channel(s) store a negative variance"
    return line
