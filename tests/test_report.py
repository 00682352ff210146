"""The two renderings of a result carry the same fields: the rich table and the JSON."""

from __future__ import annotations

import io
import json

from rich.console import Console

import bnfix
from bnfix import report
from conftest import NANO, SAMPLE


def _render(result) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(report.table(result))
    return out.getvalue()


def test_json_and_table_carry_every_field():
    result = bnfix.patch(NANO / "MobileNetV2-YOLOv3-Nano-voc.prototxt", NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel")
    data = report.to_json([result])
    layer = data["pairs"][0]["layers"][1]
    assert set(layer) == set(report.FIELDS)
    assert json.loads(json.dumps(data)) == data  # plain JSON: no NaN or Infinity
    l2 = result.layers[1]
    assert (layer["name"], layer["channels"], layer["negative_channels"]) == ("layer2-bn", 16, 3)
    text = _render(result)
    row = next(line for line in text.splitlines() if "layer2-bn" in line)
    for cell in ("layer2-bn", "16", "1e-05 → 1e-06", "variance recomputed", "eps set", "3",
                 f"{l2.err_before:.1e} → {l2.err_after:.1e}", f"{l2.max_rel_var_change:.1e}"):
        assert cell in row, cell
    assert "sqrt(var) + 1e-06 (pjreddie-cpu)" in text
    assert "57 of 57 BatchNorm layers patched (8960 channels)" in text
    assert "6 channel(s) store a negative variance" in text


def test_skip_reasons_and_up_to_date_rows(tmp_path):
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    again = bnfix.patch(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    text = _render(again)
    assert text.count("up to date (bnfix marker)") == 23
    assert "worst denominator error n/a → n/a" in text
    layer = report.to_json([again])["pairs"][0]["layers"][0]
    assert layer["status"] == "up to date" and layer["err_before"] is None and layer["err_after"] is None
    other = bnfix.patch(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", source="opencv")
    assert "skipped: patched by bnfix for sqrt(var) + 1e-06" in _render(other)
