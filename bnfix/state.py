"""Whether a layer is patched, decided from both files together.

The prototxt marker alone proves nothing: the prototxt may sit beside the original caffemodel
(an interrupted save, a copied file), beside retrained weights, or beside the output of another
bnfix run.  So a layer is PATCHED only when the caffemodel holds exactly the statistics the
marker says bnfix wrote (its ``stats`` digest), and the caffemodel's own record, when present,
agrees.  Every combination is recognised:

========================  ==========================  ======================================
prototxt                  caffemodel                  state
========================  ==========================  ======================================
no marker                 no record                   RAW: patch it
marker                    record, same stats, stats   PATCHED
                          match
marker                    no record, stats match      PATCHED (a tool re-saved the file and
                                                      dropped the record)
marker                    no record, other stats      RAW_UNDER_MARKER: statistics bnfix never
                                                      wrote (the original, retrained weights,
                                                      another model): refit them
bnfix 1.0 marker          stored eps = marker's eps   LEGACY: patched by bnfix 1.0
bnfix 1.0 marker          other eps                   RAW_UNDER_MARKER
no marker                 record                      error: patched caffemodel, unpatched
                                                      prototxt
marker                    record of another patch     error: mixed from two patches
marker                    record, stats changed       error: modified after bnfix wrote it
scale marker, no Scale    (any)                       error: the prototxt was edited since
========================  ==========================  ======================================

The errors name both files and say how to recover.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import NamedTuple

from . import marker
from .errors import InconsistentPair
from .formulas import f32
from .pairing import Group
from .result import StrategyName


class State(str, Enum):
    RAW = "raw"
    PATCHED = "patched"
    RAW_UNDER_MARKER = "raw under marker"
    LEGACY = "legacy"


class Assessment(NamedTuple):
    state: State
    detail: str = ""  # for RAW_UNDER_MARKER: what the caffemodel holds instead


def _recover(prototxt: Path, model: Path) -> str:
    return (f"restore both files from the same run (e.g. {prototxt.name}.orig and {model.name}.orig "
            "after --in-place) and run bnfix again")


def assess(g: Group, prototxt: Path, model: Path) -> Assessment:
    """The state of one layer; raises InconsistentPair for the combinations bnfix cannot trust."""
    m, r = g.marker, g.record
    where = f"layer {g.name!r}"
    if m is None:
        if r is None:
            return Assessment(State.RAW)
        raise InconsistentPair(
            f"{model}: {where} holds statistics bnfix wrote ({r.strategy.value} fit, stats {r.stats}) but "
            f"{prototxt} has no bnfix marker for it: the files come from different runs; use the prototxt "
            f"bnfix wrote with this caffemodel, or {_recover(prototxt, model)}")
    if m.legacy:
        if r is not None:
            raise InconsistentPair(f"{model}: {where} carries a bnfix 2 record but {prototxt} a bnfix 1.0 "
                                   f"marker: {_recover(prototxt, model)}")
        stored = [e.bn_param() for e in g.entries]
        if all(p is not None and p.eps == f32(m.eps) for p in stored):
            return Assessment(State.LEGACY)
        return Assessment(State.RAW_UNDER_MARKER, "its statistics were never patched by bnfix 1.0")
    if m.strategy is StrategyName.SCALE and g.scale is None:
        # The digest covered the Scale's gamma; without it, the BatchNorm blobs alone would
        # look raw and be corrected a second time on top of the folded gamma.
        raise InconsistentPair(
            f"{prototxt}: {where} was patched by folding into its Scale layer, but that Scale is no "
            f"longer found ({g.no_scale}): undo the prototxt edit, or {_recover(prototxt, model)}")
    current = marker.digest(g.stat_parts(m.strategy is StrategyName.SCALE))
    if r is None:
        if current == m.stats:
            return Assessment(State.PATCHED)
        if current == m.origin:
            return Assessment(State.RAW_UNDER_MARKER, "the caffemodel still holds the original statistics "
                              "(an interrupted save, or the original put back)")
        return Assessment(State.RAW_UNDER_MARKER, "the caffemodel holds other statistics bnfix never wrote "
                          "(retrained weights or another model)")
    if r.stats != m.stats:
        raise InconsistentPair(
            f"{prototxt} and {model}: {where} was patched by two different bnfix runs (stats {m.stats} in the "
            f"prototxt, {r.stats} in the caffemodel): {_recover(prototxt, model)}")
    if current != r.stats:
        raise InconsistentPair(
            f"{model}: {where}: its statistics changed after bnfix wrote them (stats {current}, bnfix wrote "
            f"{r.stats}): {_recover(prototxt, model)}")
    return Assessment(State.PATCHED)
