"""bnfix: make Caffe models converted from Darknet normalise exactly as Darknet did.

    import bnfix
    result = bnfix.patch("yolo.prototxt", "yolo.caffemodel", source="pjreddie-cpu")
    for layer in result.layers:
        print(layer.name, layer.status, layer.err_before, layer.err_after)
    result.save("fixed.prototxt", "fixed.caffemodel")
"""

from .errors import BnfixError
from .formulas import PRESETS, Formula, parse_source
from .patch import LayerReport, Options, Result, patch
from .revert import revert

__version__ = "1.0.0"
__all__ = ["BnfixError", "Formula", "LayerReport", "Options", "PRESETS", "Result", "parse_source", "patch", "revert"]
