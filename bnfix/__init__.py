"""bnfix: make Caffe models converted from Darknet normalise exactly as Darknet did.

    import bnfix
    result = bnfix.patch("yolo.prototxt", "yolo.caffemodel", source="pjreddie-cpu")
    for layer in result.layers:
        print(layer.name, layer.status, layer.err_before, layer.err_after)
    result.save("fixed.prototxt", "fixed.caffemodel")

The names below are loaded on first use, so that ``bnfix`` (the command) starts fast.
"""

from __future__ import annotations

try:
    from typing import TYPE_CHECKING, Any
except KeyboardInterrupt:  # Ctrl-C while the ``bnfix`` command starts: one line, no traceback
    import sys

    sys.stderr.write("bnfix: error: interrupted while starting; nothing was changed\n")
    raise SystemExit(130) from None

__version__ = "2.0.0"
__all__ = [
    "PRESETS",
    "TARGETS",
    "BnfixError",
    "Formula",
    "LayerReport",
    "Options",
    "Result",
    "Status",
    "StrategyName",
    "parse_source",
    "patch",
    "revert",
    "targets",
]

_WHERE = {
    "BnfixError": "errors", "Formula": "formulas", "PRESETS": "formulas", "parse_source": "formulas",
    "LayerReport": "result", "Options": "result", "Status": "result", "StrategyName": "result",
    "Result": "pipeline", "patch": "pipeline", "revert": "pipeline", "TARGETS": "targets",
}

if TYPE_CHECKING:
    from . import targets
    from .errors import BnfixError
    from .formulas import PRESETS, Formula, parse_source
    from .pipeline import Result, patch, revert
    from .result import LayerReport, Options, Status, StrategyName
    from .targets import TARGETS


def __getattr__(name: str) -> Any:
    import importlib

    if name == "targets":
        return importlib.import_module(".targets", __name__)
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'bnfix' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{where}", __name__), name)
