"""One pair, end to end: read → pair → assess → plan → apply → verify → a :class:`Result`.

``patch`` and ``revert`` read both files, pair their layers, decide each layer from the state
of both files, and plan every edit; nothing is encoded until a result's numbers or bytes are
needed, and nothing is written until :meth:`Result.save`, which commits the pair as one unit
(``commit.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import caffemodel, copier, pairing, prototxt, state, verify
from . import semantics as sem
from .errors import BnfixError, InputChanged
from .formulas import Formula, parse_source
from .plan import LayerPlan, plan_patch, report
from .result import LayerReport, Mode, Options, Status
from .strategies import Stats
from .strategies.revert import plan_revert

if TYPE_CHECKING:
    from .crosscheck import CrossCheck


class Deviation(NamedTuple):
    """A runtime in which the written layers do not compute what they compute in Caffe."""

    runtime: str
    worst: float | None  # the largest relative error there (None: it fails outright)
    problem: str  # how it fails ("" when it only errs)
    layers: tuple[str, ...]


class Result:
    """The outcome of :func:`patch` or :func:`revert` for one pair: per-layer reports and the
    new file contents.  Nothing is written until :meth:`save`.

    The caffemodel stays open (its bytes are copied from the very file that was read, even if
    the path is replaced meanwhile) until :meth:`close`, or until the result is garbage.
    """

    def __init__(self, prototxt_path: Path, caffemodel_path: Path, options: Options, mode: Mode,
                 plans: list[LayerPlan], warnings: list[str], doc: prototxt.Document, model: caffemodel.Model,
                 prototxt_id: tuple[int, int, int, int]):
        self.prototxt, self.caffemodel, self.options, self.mode = prototxt_path, caffemodel_path, options, mode
        self.plans, self.warnings = plans, warnings
        self.original_prototxt = doc.text
        self.new_prototxt = doc.render([sp for p in plans for sp in p.splices])
        self.outputs: tuple[Path, Path] | None = None
        self.darknet: CrossCheck | None = None
        self._model = model
        self._prototxt_id = prototxt_id
        self._applied: tuple[list[copier.Replacement], list[Stats | None]] | None = None
        self._layers: list[LayerReport] | None = None

    # -- what it found -------------------------------------------------------------------
    @property
    def needs_work(self) -> bool:
        """What ``--check`` reports: a write would change a layer, or a layer was patched by
        bnfix for other options (a gate for one target must not pass a pair patched for
        another; ``--force`` re-fits it).  Known from the plan."""
        return any(p.status in (Status.PATCHED, Status.REVERTED) or p.stale for p in self.plans)

    @property
    def changed(self) -> bool:
        return any(p.edits for p in self.plans) or self.new_prototxt != self.original_prototxt

    @property
    def layers(self) -> list[LayerReport]:
        """One report per BatchNorm name, every number computed from the bytes to be written."""
        if self._layers is None:
            _, written = self.apply()
            self._layers = [report(p, w) for p, w in zip(self.plans, written)]
        return self._layers

    def deviations(self) -> list[Deviation]:
        """Every runtime (``runtimes.RUNTIMES``) in which a layer this run patches does not
        compute what it computes in Caffe, with the worst error or the failure."""
        from . import runtimes

        _, written = self.apply()
        found: dict[str, tuple[float | None, str, list[str]]] = {}
        for p, w in zip(self.plans, written):
            if p.status is not Status.PATCHED or w is None or p.reference is None or p.formula is None:
                continue
            ref = p.reference
            target = sem.darknet_denominator([v / (ref.s or 1.0) for v in ref.var], p.formula)
            view = runtimes.Written(w.var, w.s, p.eps_after, w.gamma, ref.gamma, target, p.next_is_scale)
            own = sem.effective_error(sem.caffe_denominator(w.var, w.s, p.eps_after), w.gamma, ref.gamma, target)
            for rt in runtimes.RUNTIMES:
                worst, problem = runtimes.deviation(rt, view, own)
                if problem or worst:
                    old_worst, old_problem, names = found.get(rt.name, (0.0, "", []))
                    names.append(p.name)
                    merged = None if problem or old_problem else max(old_worst or 0.0, worst or 0.0)
                    found[rt.name] = (merged, old_problem or problem, names)
        return [Deviation(name, worst, problem, tuple(names)) for name, (worst, problem, names) in found.items()]

    # -- apply and verify ----------------------------------------------------------------
    def apply(self) -> tuple[list[copier.Replacement], list[Stats | None]]:
        """Encode every planned entry and check it with the independent decoder (once).

        Returns the caffemodel replacements and, per plan, the statistics decoded from the
        bytes it will write (None where it writes none).
        """
        if self._applied is None:
            replacements: list[copier.Replacement] = []
            written: list[Stats | None] = []
            for p in self.plans:
                decoded: list[list[Any]] = []
                for edit in p.edits:
                    data = edit.entry.rebuilt(edit.blobs, edit.replace)
                    decoded.append(verify.entry(data, edit.entry.payload, edit.blobs, edit.replace))
                    replacements.append(copier.Replacement(edit.entry.layer.start, edit.entry.layer.end, data))
                written.append(_written(p, decoded))
            replacements += self._records()
            replacements.sort()
            self._applied = replacements, written
        return self._applied

    def _records(self) -> list[copier.Replacement]:
        """bnfix's records after this run, at the end of the caffemodel: this run's layers' new
        (or kept) records, then those of layers it did not look at; nothing if they are already
        there, byte for byte."""
        model = self._model
        mine = {p.name: p.record for p in self.plans}
        order: dict[str, int] = {}
        for layer in model.layers:
            order.setdefault(layer.name, layer.position)
        wanted = [(name, m.record()) for name, m in mine.items() if m is not None]
        wanted += [(r.layer, r.text) for r in model.records if r.layer not in mine]
        wanted.sort(key=lambda item: (order.get(item[0], len(order)), item[0]))
        tail = b"".join(caffemodel.encode_record(name, text) for name, text in wanted)
        verify.records(tail, wanted)
        old = model.records
        if old and old[-1].end == model.size and old[0].start == model.size - sum(r.end - r.start for r in old):
            start = old[0].start  # the records bnfix appended last time: one range
            if model.tail(start) == tail:
                return []
            return [copier.Replacement(start, model.size, tail)]
        return [copier.Replacement(r.start, r.end, b"") for r in old] + (
            [copier.Replacement(model.size, model.size, tail)] if tail else [])

    # -- writing -------------------------------------------------------------------------
    def save(self, prototxt_out: str | Path, caffemodel_out: str | Path, *, backup: bool = False,
             sync: bool = True, progress: Callable[[int], None] | None = None, lock: bool = True,
             on_commit: Callable[[], None] | None = None) -> None:
        """Write both outputs as one unit: all or nothing, in an order that a crash between the
        two renames can only leave a state the next run recognises (``commit.py``).

        ``backup`` keeps ``<output>.orig`` copies of files about to be replaced (for in-place);
        ``sync=False`` skips the fsyncs.  ``lock`` takes bnfix's advisory locks on the outputs
        (the CLI takes them itself, before reading).  ``on_commit``: see :func:`commit.commit`.
        """
        from . import commit
        from . import lock as locking

        outs = (Path(prototxt_out), Path(caffemodel_out))
        in_place = [_same_file(o, i) for o, i in zip(outs, (self.prototxt, self.caffemodel))]
        if any(in_place) and not backup and not all(in_place):
            raise BnfixError(f"{outs[in_place.index(True)]}: output would overwrite its input")
        replacements, _ = self.apply()
        size = self._model.size
        model_fd = self._model.fileno()

        def write_model(fd: int) -> None:
            try:
                copier.write(model_fd, size, replacements, fd, progress)
            except InputChanged as exc:
                raise InputChanged(f"{self.caffemodel}: the file changed while bnfix was running ({exc})") from None
            # The bytes came from the file that was read; another program writing into it
            # meanwhile would have mixed them: then nothing is renamed.
            caffemodel.check_file(self.caffemodel, self._model)

        text = self.new_prototxt.encode("utf-8", "surrogateescape")
        items = [commit.Output(outs[0], text, like=self.prototxt, in_place=in_place[0]),
                 commit.Output(outs[1], write_model, like=self.caffemodel, in_place=in_place[1])]
        if self.mode is Mode.REVERT:
            items.reverse()  # the caffemodel first: see the module docstring of state.py
        created = [d for out in outs for d in commit.make_dirs(out.parent)] if lock else []
        try:
            held = locking.acquire(exclusive=outs, shared=(), wait=0, owner="bnfix") if lock else None
            try:
                self._check_inputs_unchanged()
                done = commit.commit(items, backup=backup, sync=sync, on_commit=on_commit)
            finally:
                if held is not None:
                    held.release()
        except BaseException:
            commit.remove_dirs(created)
            raise
        self.outputs = (done.outputs[0], done.outputs[1]) if self.mode is Mode.PATCH else (
            done.outputs[1], done.outputs[0])
        self.warnings.extend(done.warnings)

    def _check_inputs_unchanged(self) -> None:
        if _identity(self.prototxt) != self._prototxt_id:
            raise InputChanged(f"{self.prototxt}: the file changed while bnfix was running")
        caffemodel.check_file(self.caffemodel, self._model)

    def close(self) -> None:
        self._model.close()

    def __del__(self) -> None:
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()


def _written(p: LayerPlan, decoded: list[list[Any]]) -> Stats | None:
    """The plan's statistics as decoded from its written bytes (its first BatchNorm entry, and
    the Scale entry when one was rewritten), or as they stay when nothing is rewritten."""
    if p.after is None:
        return None
    if not decoded:
        return p.after
    bn = decoded[0]
    gamma = p.after.gamma
    if len(p.edits) > 1 and p.edits[-1].entry.layer.type == "Scale":
        gamma = decoded[-1][0]
    return Stats(bn[0], bn[1], float(bn[2][0]), gamma)


def _identity(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, -1, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- entry points ----------------------------------------------------------------------------


def patch(prototxt_path: str | Path, caffemodel_path: str | Path, options: Options | None = None, *,
          target: str | None = None, strategy: str | None = None, source: str | Formula | None = None,
          target_eps: float | None = None, force: bool = False) -> Result:
    """Read a converted pair and plan the patch (nothing is written).

    Either ``options``, or the CLI's choices as keywords: ``target`` (a ``bnfix.TARGETS`` name,
    default "caffe"), ``strategy`` ("eps" or "scale", overriding the target's), ``source`` (a
    preset name, a ``sqrt(var+A)+B`` string or a Formula), ``target_eps`` and ``force``.
    ``result.layers`` gives the per-layer reports; ``result.save(...)`` writes the outputs.
    """
    if options is None:
        from . import targets
        from .formulas import DEFAULT_SOURCE, PRESETS

        if source is None or isinstance(source, str):
            try:
                source = parse_source(source) if source else PRESETS[DEFAULT_SOURCE]
            except ValueError as exc:
                raise BnfixError(str(exc)) from None
        options = targets.resolve(target, strategy, target_eps, source, force)
    elif (target, strategy, source, target_eps, force) != (None, None, None, None, False):
        raise TypeError("give either options or keyword arguments, not both")
    return run(Path(prototxt_path), Path(caffemodel_path), options.checked(), Mode.PATCH)


def revert(prototxt_path: str | Path, caffemodel_path: str | Path) -> Result:
    """Plan the pre-bnfix files of a patched pair (``result.save`` writes them)."""
    return run(Path(prototxt_path), Path(caffemodel_path), Options(), Mode.REVERT)


def run(pp: Path, mp: Path, options: Options, mode: Mode) -> Result:
    """Read both files, pair their layers, assess and plan each, check the prototxt edits."""
    _refuse_swapped(pp, mp)
    pid = _identity(pp)  # before the read: a change from here on shows at save time
    doc = prototxt.read(pp)
    model = caffemodel.Model(mp)
    try:
        groups, warnings = pairing.pair(doc, model)
        plans = []
        for g in groups:
            a = state.assess(g, pp, mp)
            plans.append(plan_patch(g, a, options, mp) if mode is Mode.PATCH else plan_revert(g, a))
        doc.check_splices([sp for p in plans for sp in p.splices], [l for g in groups for l in g.proto])
        return Result(pp, mp, options, mode, plans, warnings, doc, model, pid)
    except BaseException:
        model.close()
        raise


def _refuse_swapped(pp: Path, mp: Path) -> None:
    """A binary first argument and a text second one: say so, rather than two confusing errors."""
    try:
        head_p, head_m = _head(pp), _head(mp)
    except (BnfixError, OSError):
        return  # the readers below report the file that cannot be read
    if b"\0" in head_p and head_m and b"\0" not in head_m and _textual(head_m):
        raise BnfixError(f"{pp}: is binary and {mp} is text: the arguments look swapped "
                         "(give the .prototxt first, then the .caffemodel)")


def _head(path: Path) -> bytes:
    from . import files

    fd = files.open_regular(path)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _textual(head: bytes) -> bool:
    return all(b in b"\t\r\n" or 32 <= b < 127 or b >= 128 for b in head)
