"""What bnfix leaves behind to recognise its own work: a marker in each file of the pair.

* In the **prototxt**, a comment appended to the line that opens each patched layer::

      layer {  # bnfix: eps fit to sqrt(var) + 1e-06, eps 1e-06, stats 3f09a1c2b7d1 from 9c41d0e2aa57 [undo eps=none]

* In the **caffemodel**, a *record*: a top-level ``NetParameter`` field appended at the end of
  the file (field 536870911, the largest protobuf field number, which no Caffe fork uses),
  holding the layer name and the same text.  Protobuf parsers keep unknown fields and ignore
  them, so the record changes nothing at inference.

Both name the strategy, the Darknet formula, the eps, and two short digests: ``stats`` of the
statistics bnfix wrote (BatchNorm blobs, plus the Scale blobs when the layer has one) and
``from`` of the statistics it read.  Each keeps its own file's undo information (what the
patch replaced there), so either file can be reverted and neither is trusted alone: a layer
is "patched" only when both markers agree and the caffemodel still holds exactly the ``stats``
digest (``state.py``).

bnfix 1.0 wrote ``# bnfix: fitted to FORMULA, eps EPS [undo ...]`` with no digests and no
caffemodel record; such markers are read as *legacy*.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .errors import MarkerError
from .formulas import Formula, parse_source
from .result import StrategyName

try:  # the C module behind hashlib.blake2b, without hashlib's import of OpenSSL (3 ms a run)
    from _blake2 import blake2b as _blake2b
except ImportError:  # not CPython
    from hashlib import blake2b as _blake2b

RECORD_FIELD = 536870911  # NetParameter field holding a caffemodel-side record
DIGEST_CHARS = 12

_V2 = re.compile(
    r"# bnfix: (?P<strategy>[a-z]+) fit to (?P<expr>[^,\]]+), eps (?P<eps>[^,\s\]]+), "
    r"stats (?P<stats>[0-9a-f]{12}) from (?P<origin>[0-9a-f]{12}) \[undo(?P<undo>[^\]]*)\]"
)
_V1 = re.compile(r"# bnfix: fitted to (?P<expr>[^,\]]+), eps (?P<eps>\S+) \[undo(?P<undo>[^\]]*)\]")
_PREFIX = "# bnfix:"

def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# The undo keys each place may hold, and the values they may take.
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?")
_UNDO_VALUES: dict[str, Callable[[str], bool]] = {
    "eps": lambda v: v in ("none", "block") or bool(_NUMBER.fullmatch(v)),
    "ugs": lambda v: v == "false",
    "model": lambda v: v == "none",
    "model.eps": lambda v: v == "none" or _is_float(v),
    "model.ugs": lambda v: v == "false",
    "s": lambda v: _is_float(v) and float(v) >= 0,
}
PROTOTXT_KEYS = ("eps", "ugs")
RECORD_KEYS = ("model", "model.eps", "model.ugs", "s")


class Marker(NamedTuple):
    """One marker (prototxt comment or caffemodel record): what a patch did and what it replaced.

    ``stats``/``origin`` are None for a bnfix 1.0 marker (``legacy``), which had no digests.
    """

    strategy: StrategyName
    formula: Formula
    eps: float
    stats: str | None
    origin: str | None
    undo: tuple[tuple[str, str], ...] = ()

    @property
    def legacy(self) -> bool:
        return self.stats is None

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.undo if k == key), None)

    def text(self) -> str:
        """The marker body (without the two leading spaces), identical in both files."""
        undo = "".join(f" {k}={v}" for k, v in self.undo)
        return (f"{_PREFIX} {self.strategy.value} fit to {self.formula.expression}, eps {self.eps!r}, "
                f"stats {self.stats} from {self.origin} [undo{undo}]")

    def comment(self) -> str:
        """The prototxt form: appended to the layer's opening line."""
        return "  " + self.text()

    def record(self) -> bytes:
        """The caffemodel form: the payload of the record field."""
        return self.text().encode("ascii")


def parse(text: str, where: str, keys: tuple[str, ...]) -> Marker:
    """Read a marker body (starting at ``# bnfix:``); ``where`` names the place for errors."""
    m = _V2.fullmatch(text)
    legacy = m is None
    if legacy:
        m = _V1.fullmatch(text)
        keys = PROTOTXT_KEYS + RECORD_KEYS  # bnfix 1.0 kept everything in the prototxt
    if m is None:
        raise MarkerError(f"{where}: unreadable bnfix marker {text!r}")
    try:
        formula = parse_source(m["expr"])
        eps = float(m["eps"])
    except ValueError:
        raise MarkerError(f"{where}: corrupt bnfix marker: formula {m['expr']!r}, eps {m['eps']!r}") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise MarkerError(f"{where}: corrupt bnfix marker: eps {m['eps']!r}")
    try:
        strategy = StrategyName.EPS if legacy else StrategyName(m["strategy"])
    except ValueError:
        raise MarkerError(f"{where}: bnfix marker names an unknown strategy {m['strategy']!r} "
                          "(written by a newer bnfix?)") from None
    undo = []
    for item in m["undo"].split():
        key, sep, value = item.partition("=")
        check = _UNDO_VALUES.get(key)
        if not sep or key not in keys or check is None or not check(value):
            raise MarkerError(f"{where}: corrupt bnfix marker: undo entry {item!r}")
        undo.append((key, value))
    stats = None if legacy else m["stats"]
    origin = None if legacy else m["origin"]
    return Marker(strategy, formula, eps, stats, origin, tuple(undo))


def find_in_text(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of a marker body (``# bnfix:`` to its ``]``) inside ``text[start:end]``."""
    at = text.find(_PREFIX, start, end)
    if at < 0:
        return None
    close = text.find("]", at, end)
    return at, (end if close < 0 else close + 1)


def parse_record(data: bytes, where: str) -> Marker:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MarkerError(f"{where}: unreadable bnfix record (not ASCII)") from None
    if not text.startswith(_PREFIX):
        raise MarkerError(f"{where}: unreadable bnfix record {text[:60]!r}")
    return parse(text, where, RECORD_KEYS)


def digest(parts: Iterable[bytes]) -> str:
    """A short digest of statistics (their stored bytes, in order), to recognise them later.

    48 bits: a chance match between two different sets of statistics is 1 in 2.8e14.
    """
    h = _blake2b(digest_size=DIGEST_CHARS // 2)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()
