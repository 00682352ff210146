"""The bench's output: console tables while it runs, and the README's tables in Markdown.

The README's "Performance" section is pasted from :func:`readme_tables`, so the numbers in it
are always ones the bench printed, in one format.  Every function here is pure: it takes the
results (see ``suite.py`` for their shape) and returns text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from generate import SIZES
from goals import Verdict

Results = dict[str, Any]


def console(rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: the first left-aligned, the rest right-aligned; rule after the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  " + "  ".join(s.ljust(w) if i == 0 else s.rjust(w)
                                    for i, (s, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def secs(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f} s" if v >= 0.095 else f"{v * 1000:.0f} ms"


def ms(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.1f} ms" if v >= 1 else f"{v:.2f} ms")


def times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} MiB"


def _median(res: Results, key: str) -> float | None:
    v = res["contenders"].get(key, {}).get("median_s")
    return None if v is None else float(v)


def _model_label(size: str, res: Results) -> str:
    return f"{SIZES[size].label}, {res['manifest']['bytes'] / 1e6:.0f} MB"


# --------------------------------------------------------------------------------------------
# README tables
# --------------------------------------------------------------------------------------------

def main_table(results: Results) -> str:
    """Like for like, one row per model size and one for many small pairs in one call."""
    rows = [["model", "bnfix `--no-sync`", "cp", "ratio", "bnfix (durable)", "cp && sync",
             "ratio", "bnfix peak RSS"]]
    for size, res in results.get("sizes", {}).items():
        r = res["ratios"]
        rows.append([_model_label(size, res), secs(_median(res, "bnfix")), secs(_median(res, "cp")),
                     times(r["plain"]), secs(_median(res, "bnfix_sync")),
                     secs(_median(res, "cp_sync")), times(r["durable"]), mib(res["rss_mib"])])
    pairs = results.get("pairs")
    if pairs:
        p, r = pairs["per_pair_ms"], pairs["ratios"]
        rows.append([f"{pairs['n']:,} small pairs in one call, per pair", ms(p.get("bnfix")),
                     ms(p.get("cp")), times(r["plain"]), ms(p.get("bnfix_sync")),
                     ms(p.get("cp_sync")), times(r["durable"]), mib(pairs["rss_mib"])])
    return markdown(rows)


def goals_table(verdicts: Sequence[Verdict], n_pairs: int | None) -> str:
    rows = [["goal (issue 10)", "limit", "measured", "met"]]
    for v in verdicts:
        g = v.goal
        if "{n}" in g.text and n_pairs is None:
            continue
        unit = {"×": "×", "ms": " ms", "MiB": " MiB"}[g.unit]
        value = "n/a" if v.value is None else f"{v.value:.{2 if g.unit == '×' else 1}f}{unit}"
        met = {"PASS": "yes", "FAIL": "**no**", "SKIP": "not measured"}[v.status]
        rows.append([g.text.format(n=f"{n_pairs:,}" if n_pairs else "N"), f"≤ {g.limit:g}{unit}",
                     value, met])
    return markdown(rows)


def reference_table(results: Results) -> str:
    """What the design saves (naive), the pure-Python backend, start-up floors."""
    rows = [["model", "naive protobuf round trip", "naive / bnfix", "naive peak RSS",
             "bnfix, pure-Python protobuf", "pure-Python / upb"]]
    for size, res in results.get("sizes", {}).items():
        c, r = res["contenders"], res["ratios"]
        rows.append([_model_label(size, res), secs(_median(res, "naive")),
                     times(r.get("naive_over_bnfix")), mib(c.get("naive", {}).get("peak_rss_mib")),
                     secs(_median(res, "bnfix_pyproto")), times(r.get("pyproto_over_upb"))])
    return markdown(rows)


def floors_line(results: Results) -> str:
    c = results.get("floors", {}).get("contenders", {})

    def med(k: str) -> str:
        return secs(c.get(k, {}).get("median_s"))

    rss = c.get("true", {}).get("peak_rss_mib")
    return (f"Floors: spawning `true` {med('true')}, `python -c pass` {med('python')}, "
            f"`python -m bnfix --help` {med('startup')}"
            + (f", `bnfix --help` {med('startup_script')}" if "startup_script" in c else "")
            + f". RSS floor (the spawner's share of every child's `ru_maxrss`): {mib(rss)}.")


def inproc_table(results: Results) -> str:
    rows = [["in process, after `import bnfix`"] + [_model_label(s, r) for s, r in
                                                     results.get("sizes", {}).items()]]
    cells: dict[str, list[str]] = {}
    for res in results.get("sizes", {}).values():
        ip = res.get("inproc") or {}
        for phase, label in (("warm", "`patch()` + `save(sync=False)` / one `copy_file_range`"),
                             ("durable", "`patch()` + `save()` / `copy_file_range` + `fsync`")):
            p = ip.get(phase)
            cells.setdefault(label, []).append(
                "n/a" if not p else f"{times(p['ratio'])} ({secs(next(iter(p['medians'].values())))})")
        cells.setdefault("`import bnfix`", []).append(secs(ip.get("import_s")))
    rows += [[k, *v] for k, v in cells.items()]
    return markdown(rows)


def folio_count(hist: dict[str, int]) -> str:
    """Total folios of a ``{pages per folio: count}`` histogram (JSON keys are strings), as 3.8k."""
    n = sum(hist.values())
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def anatomy_table(results: Results) -> str:
    """Every copy pattern: median time, and in brackets its pair-by-pair ratio to the phase's
    first row (one whole-file copy_file_range, warm / cold / durable) and, when the bench ran
    as root, how many page-cache folios the output was written into."""
    sizes = {s: r["anatomy"] for s, r in results.get("sizes", {}).items()
             if "phases" in (r.get("anatomy") or {})}
    if not sizes:
        return "(no copy anatomy in this run)"
    rows = [["copy pattern (in process)"] + [f"{a['bytes'] / 1e6:.0f} MB" for a in sizes.values()]]
    keys: list[str] = []
    for a in sizes.values():
        for phase in a["phases"].values():
            keys += [k for k in phase["variants"] if k not in keys]
    for k in keys:
        row = [k]
        for a in sizes.values():
            v = next((ph["variants"][k] for ph in a["phases"].values() if k in ph["variants"]), None)
            row.append("n/a" if v is None else f"{secs(v['median_s'])} ({v['ratio']:.2f}×"
                       + (f", {folio_count(v['folios'])} folios)" if v.get("folios") else ")"))
        rows.append(row)
    first = next(iter(sizes.values()))
    note = (f"\n\n{first['pieces']} pieces, {first['batchnorm_entries']} BatchNorm entries; "
            f"reflink on this file system: {first['reflink']}.")
    extents = {k: [a["phases"]["durable"]["variants"].get(k, {}).get("extents")
                   for a in sizes.values()]
               for k in keys if any("durable" in a["phases"] and k in a["phases"]["durable"]["variants"]
                                    for a in sizes.values())}
    if extents:
        note += " Extents of the durable outputs: " + "; ".join(
            f"{k.removeprefix('durable: ')}: {'/'.join(str(e) for e in v)}" for k, v in extents.items()) + "."
    return markdown(rows) + note


def readme_tables(results: Results, verdicts: Sequence[Verdict]) -> str:
    n = results.get("pairs", {}).get("n")
    parts = [("Whole process, like for like (medians; ratios are medians of the ratio within each "
             "round):"), main_table(results), "Goals:", goals_table(verdicts, n),
             "For reference:", reference_table(results), floors_line(results)]
    if any("inproc" in r for r in results.get("sizes", {}).values()):
        parts += ["In process:", inproc_table(results)]
    parts += ["Copy anatomy:", anatomy_table(results)]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# console reports, while the bench runs
# --------------------------------------------------------------------------------------------

def contenders_report(res: Results, base: str = "cp") -> str:
    b = _median(res, base)
    rows = [["contender", "median", "min", "peak RSS", f"× {base}"]]
    notes = []
    for c in res["contenders"].values():
        if "median_s" not in c:
            rows.append([c["label"], "-", "-", "-", "skipped" if "skipped" in c["error"] else "FAILED"])
            notes.append(f"  {c['label']}: {c['error']}")
            continue
        rows.append([c["label"], secs(c["median_s"]), secs(c["min_s"]), mib(c["peak_rss_mib"]),
                     times(c["median_s"] / b) if b else "-"])
    return "\n".join([console(rows), *notes])


def anatomy_report(a: Results) -> str:
    if "phases" not in a:
        return f"  copy anatomy: {a.get('error')}"
    rows = [["copy pattern", "median", "min", "× base (paired)", "output folios"]]
    for phase in a["phases"].values():
        for k, v in phase["variants"].items():
            rows.append([k, secs(v["median_s"]), secs(v["min_s"]), times(v["ratio"]),
                         folio_count(v["folios"]) if v.get("folios") else "-"])
    bad = a.get("byte_mismatches")
    return console(rows) + (f"\n  WRONG BYTES from: {', '.join(bad)}" if bad else "")


def size_report(size: str, res: Results) -> str:
    m = res["manifest"]
    lines = [(f"\n{size}: {m['bytes'] / 1e6:.1f} MB caffemodel, {m['batchnorm']} BatchNorm, "
             f"{res['rounds']} rounds (load average {res['loadavg']}):"), contenders_report(res),
             (f"  paired ratios: --no-sync/cp {times(res['ratios']['plain'])}, "
             f"durable/cp && sync {times(res['ratios']['durable'])}")]
    ip = res.get("inproc")
    if ip and "warm" in ip:
        lines.append(f"  in process: patch+save(sync=False) {times(ip['warm']['ratio'])} one copy "
                     f"(patch {secs(ip['warm']['patch_median_s'])} + save "
                     f"{secs(ip['warm']['save_median_s'])}); save() {times(ip['durable']['ratio'])} "
                     f"copy+fsync; import bnfix {secs(ip['import_s'])}")
    elif ip:
        lines.append(f"  in process: {ip.get('error')}")
    if "anatomy" in res:
        lines.append(anatomy_report(res["anatomy"]))
    return "\n".join(lines)


def pairs_report(res: Results) -> str:
    p = res["per_pair_ms"]
    return "\n".join([
        f"\n{res['n']} small pairs, {res['rounds']} rounds (load average {res['loadavg']}):",
        contenders_report(res),
        "  per pair: " + ", ".join(f"{k} {ms(v)}" for k, v in p.items()),
        (f"  paired ratios: --no-sync/cp {times(res['ratios']['plain'])}, "
        f"durable/cp && sync {times(res['ratios']['durable'])}")])
