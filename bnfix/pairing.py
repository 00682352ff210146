"""Pair the two files: each BatchNorm name of the prototxt with its caffemodel entries, the
Scale layer that consumes its output, and bnfix's markers in both files.

Layers are matched by name (a training snapshot holds layers the deploy prototxt does not
have, and the order may differ).  A BatchNorm's *companion* is the Scale layer that is the only
consumer of its output at TEST time: the first later layer reading the BatchNorm's top blob,
if nothing else reads that blob before it is overwritten.  Only then can a correction folded
into the Scale's gamma reach every path the BatchNorm feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from . import caffemodel, marker, prototxt
from .errors import MarkerError, MismatchError
from .marker import Marker


class Placed(NamedTuple):
    """A prototxt marker and its span (the two spaces before ``# bnfix:`` to its ``]``)."""

    marker: Marker
    start: int
    end: int


class Companion:
    """The Scale layer a BatchNorm feeds: its prototxt layer and its caffemodel entries.

    The entries are decoded on first use: only the scale strategy (or undoing it) reads them.
    """

    __slots__ = ("_entries", "_layers", "_model", "adjacent", "channels", "proto")

    def __init__(self, proto: prototxt.Layer, layers: Sequence[caffemodel.Layer], model: caffemodel.Model,
                 channels: int, adjacent: bool):
        self.proto, self._layers, self._model = proto, tuple(layers), model
        self.channels, self.adjacent = channels, adjacent  # adjacent: the very next layer (caffe2onnx)
        self._entries: tuple[caffemodel.Entry, ...] | None = None

    @property
    def entries(self) -> tuple[caffemodel.Entry, ...]:
        if self._entries is None:
            self._entries = tuple(self._model.entry(e) for e in self._layers)
        return self._entries

    def problem(self) -> str:
        """Why its caffemodel entries cannot take a fold ("" when they can)."""
        for e in self.entries:
            if not 1 <= len(e.blobs) <= 2 or any(b.count != self.channels for b in e.blobs):
                return f"Scale layer {self.proto.name!r} does not hold {self.channels} gamma (and beta) values"
        return ""


class Group(NamedTuple):
    """Everything of one BatchNorm name, from both files."""

    name: str
    proto: tuple[prototxt.Layer, ...]  # phase-split duplicates share a name
    entries: tuple[caffemodel.Entry, ...]
    scale: Companion | None
    no_scale: str  # why there is no companion ("" when there is)
    markers: tuple[Placed | None, ...]  # per prototxt layer
    record: Marker | None
    next_is_scale: bool  # the next prototxt layer is a Scale (all caffe2onnx pairs with)

    @property
    def marker(self) -> Marker | None:
        return next((p.marker for p in self.markers if p is not None), None)

    @property
    def channels(self) -> int:
        blobs = self.entries[0].blobs
        return blobs[0].count if blobs else 0

    def stat_parts(self, with_scale: bool) -> list[bytes]:
        """The stored bytes a digest covers: every BatchNorm blob, then, for the scale strategy
        (which writes gamma), the Scale's blobs."""
        parts = [b.raw for e in self.entries for b in e.blobs]
        if with_scale and self.scale is not None:
            parts += [b.raw for e in self.scale.entries for b in e.blobs]
        return parts


def find_marker(layer: prototxt.Layer) -> Placed | None:
    """The bnfix marker on the line that opens ``layer``, if any."""
    doc = layer.doc
    start, end = doc.line_start(layer.field.start), doc.line_end(layer.field.start)
    for tok in doc.comments_between(start, end):
        found = marker.find_in_text(doc.text, tok.start, tok.end)
        if found is None:
            continue
        body = doc.text[found[0] : found[1]]
        m = marker.parse(body, f"{doc.where(found[0])}: layer {layer.name!r}", marker.PROTOTXT_KEYS)
        # The marker starts with the two spaces bnfix writes before it: outside the comment
        # token when it stands alone, inside it when appended to an existing comment.
        lead = found[0] - 2 if doc.text[found[0] - 2 : found[0]] == "  " else found[0]
        end = found[1]
        if doc.text[end : end + 2] == "\n\r":
            end += 1  # the LF bnfix wrote to end its comment on a CR-terminated line (plan.py)
        return Placed(m, lead, end)
    return None


def pair(doc: prototxt.Document, model: caffemodel.Model) -> tuple[list[Group], list[str]]:
    """Group the prototxt's BatchNorm layers by name and find each in the caffemodel."""
    by_name: dict[str, list[caffemodel.Layer]] = {}
    for entry in model.layers:
        by_name.setdefault(entry.name, []).append(entry)
    layers = doc.layers()
    position = {id(layer): i for i, layer in enumerate(layers)}
    flow = _Flow(layers)
    proto_by_name: dict[str, list[prototxt.Layer]] = {}
    for layer in layers:
        if layer.type != "BatchNorm":
            continue
        if not layer.name:
            raise doc.error(layer.field.start, "BatchNorm layer without a name: it cannot be matched to the caffemodel")
        layer.validate()  # parse errors in its batch_norm_param surface here, naming the line
        proto_by_name.setdefault(layer.name, []).append(layer)
    records = _records(model)
    groups = []
    for name, proto in proto_by_name.items():
        entries = _entries(name, by_name.get(name, []), "BatchNorm", model, doc)
        channels = entries[0].blobs[0].count if entries[0].blobs else 0
        scale, why = _companion(flow, position, proto, channels, by_name, model)
        placed = tuple(find_marker(layer) for layer in proto)
        _same_markers(name, placed, doc)
        bn = next((l for l in proto if l.runs_at_test), proto[0])
        at = position[id(bn)] + 1
        following = layers[at] if at < len(layers) else None
        groups.append(Group(name, tuple(proto), tuple(entries), scale, why, placed, records.get(name),
                            following is not None and following.type == "Scale"))
    warnings = []
    extra = [l.name for l in model.layers if l.type == "BatchNorm" and l.name not in proto_by_name]
    if extra:
        warnings.append(f"{len(extra)} BatchNorm layer(s) only in the caffemodel were left alone: "
                        + ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
    if not groups:
        warnings.append(f"{doc.path}: no BatchNorm layers: nothing to patch")
    return groups, warnings


def _entries(name: str, found: list[caffemodel.Layer], kind: str, model: caffemodel.Model,
             doc: prototxt.Document) -> list[caffemodel.Entry]:
    if not found:
        raise MismatchError(f"{model.path}: has no layer {name!r}, which is a {kind} layer in {doc.path} "
                            "(do the two files belong together?)")
    wrong = [e for e in found if e.type != kind]
    if wrong:
        raise MismatchError(f"{model.path}: layer {name!r} is {wrong[0].type!r} there but {kind} in {doc.path}")
    return [model.entry(e) for e in found]


def _records(model: caffemodel.Model) -> dict[str, Marker]:
    """bnfix's caffemodel-side records by layer name; one layer's records must agree."""
    out: dict[str, Marker] = {}
    texts: dict[str, bytes] = {}
    for r in model.records:
        where = f"{model.path}: layer {r.layer!r}"
        if r.layer in texts and texts[r.layer] != r.text:
            raise MarkerError(f"{where}: the caffemodel holds two different bnfix records for it")
        texts[r.layer] = r.text
        out[r.layer] = marker.parse_record(r.text, where)
    return out


def _same_markers(name: str, placed: Sequence[Placed | None], doc: prototxt.Document) -> None:
    found = {p.marker for p in placed if p is not None}
    if len(found) > 1 or (found and None in placed):
        raise MarkerError(f"{doc.path}: the {len(placed)} layers named {name!r} carry different bnfix markers; "
                          "restore the prototxt (e.g. from its .orig) and run bnfix again")


class _Flow:
    """Each layer's bottoms, tops and TEST-time flag, read once per layer and pair (a scan for
    the readers of a BatchNorm's output visits the layers after it)."""

    def __init__(self, layers: Sequence[prototxt.Layer]):
        self.layers = layers
        self._io: list[tuple[list[str], list[str], bool] | None] = [None] * len(layers)

    def io(self, i: int) -> tuple[list[str], list[str], bool]:
        found = self._io[i]
        if found is None:
            layer = self.layers[i]
            found = self._io[i] = (layer.bottoms, layer.tops, layer.runs_at_test)
        return found


def _companion(flow: _Flow, positions: dict[int, int], proto: Sequence[prototxt.Layer], channels: int,
               by_name: dict[str, list[caffemodel.Layer]], model: caffemodel.Model
               ) -> tuple[Companion | None, str]:
    """The Scale layer that alone consumes the BatchNorm's output at TEST time, or why none."""
    layers = flow.layers
    bn = next((l for l in proto if l.runs_at_test), proto[0])
    if len(bn.tops) != 1:
        return None, f"the BatchNorm has {len(bn.tops)} tops"
    blob = bn.tops[0]
    position = positions[id(bn)]
    readers = []
    for i in range(position + 1, len(layers)):
        bottoms, tops, at_test = flow.io(i)
        if not at_test:
            continue
        if blob in bottoms:
            readers.append(layers[i])
        if blob in tops:
            break
    if not readers:
        return None, f"no layer reads its output {blob!r}"
    first = readers[0]
    if first.type != "Scale":
        return None, f"its output {blob!r} feeds {first.type} layer {first.name!r}, not a Scale layer"
    if len(readers) > 1:
        return None, f"its output {blob!r} also feeds layer {readers[1].name!r}, not only Scale {first.name!r}"
    if len(first.bottoms) != 1:
        return None, f"Scale layer {first.name!r} has {len(first.bottoms)} bottoms (a scale_channels product)"
    for what, default in (("axis", 1), ("num_axes", 1)):
        f = first.param_field("scale_param", what)
        if f is not None and first.doc.scalar(f) != str(default):
            return None, f"Scale layer {first.name!r} has {what} {first.doc.scalar(f)}, not a per-channel scale"
    found = by_name.get(first.name, [])
    if not found or any(e.type != "Scale" for e in found):
        return None, f"Scale layer {first.name!r} has no Scale entry in the caffemodel"
    return Companion(first, found, model, channels, positions[id(first)] == position + 1), ""
