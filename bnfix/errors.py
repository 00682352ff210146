"""The errors bnfix raises, one class per kind of failure.

Every one is a :class:`BnfixError` whose message is a single user-facing line that names the
user's file (and layer/channel); the CLI prints it as ``bnfix: error: ...`` and exits 2.  The
subclasses let a script (or a test) tell the failures apart without parsing messages.
Anything that is *not* a ``BnfixError`` is a bug in bnfix: the CLI exits 3 for it.
"""

from __future__ import annotations


class BnfixError(Exception):
    """A problem with the user's input or environment, phrased for the user (names the file)."""


class InputError(BnfixError):
    """An input cannot be read as a file at all: missing, not a regular file, no permission."""


class ParseError(BnfixError):
    """The prototxt is not valid protobuf text format (the message carries file:line:col)."""


class WireError(BnfixError):
    """The caffemodel bytes are not the protobuf message they should be."""


class MismatchError(BnfixError):
    """The two files do not belong together (a BatchNorm layer missing or of another type)."""


class StatisticsError(BnfixError):
    """A layer's statistics are corrupt (NaN, a negative variance, a bad scale factor, ...)."""


class MarkerError(BnfixError):
    """A bnfix marker (prototxt) or record (caffemodel) is present but unreadable."""


class InconsistentPair(BnfixError):
    """The prototxt and the caffemodel disagree about what bnfix did to them (a mixed pair).

    The message says what is inconsistent and how to recover (e.g. from the ``.orig`` files).
    """


class InputChanged(BnfixError):
    """An input changed on disk while bnfix was running: nothing is written from it."""


class UsageError(BnfixError):
    """Options that cannot go together, or an output path that would destroy something."""
