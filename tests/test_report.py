"""The renderings of a result carry the same fields: the rich table, the one-line form and the JSON."""

from __future__ import annotations

import io
import json

from conftest import NANO, SAMPLE
from rich.console import Console

import bnfix
from bnfix import report
from bnfix.result import LayerReport

NANO_P, NANO_M = NANO / "MobileNetV2-YOLOv3-Nano-voc.prototxt", NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel"


def _render(result) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(report.table(result))
    return out.getvalue()


def test_json_and_table_carry_every_field():
    result = bnfix.patch(NANO_P, NANO_M)
    data = report.pair_dict(result)
    layer = data["layers"][1]
    assert set(layer) == set(report.FIELDS) == set(LayerReport._fields)
    assert json.loads(json.dumps(data)) == data  # plain JSON: no NaN or Infinity
    l2 = result.layers[1]
    assert (layer["name"], layer["channels"], layer["negative_channels"], layer["strategy"], layer["changed"]) == (
        "layer2-bn", 16, 3, "eps", "variance")
    text = _render(result)
    row = next(line for line in text.splitlines() if "layer2-bn" in line)
    for cell in ("layer2-bn", "16", "1e-05 → 1e-06", "variance recomputed", "eps set", "3",
                 f"{l2.err_before:.1e} → {l2.err_after:.1e}", f"{l2.max_rel_change:.1e}"):
        assert cell in row, cell
    assert "sqrt(var) + 1e-06 (pjreddie-cpu)" in text
    assert "target caffe (the default)" in text
    assert "57 of 57 BatchNorm layers patched (8960 channels)" in text
    assert "6 channel(s) store a negative variance" in text
    assert "(worst layers first)" in text  # 57 rows: a long table
    rows = [line for line in text.splitlines() if line.startswith("│ layer")]
    assert len(rows) == 57


def test_the_summary_says_where_the_output_is_not_right():
    """The default (eps 1e-6) output is right in Caffe, not where eps is clamped or hard-coded,
    nor in caffe2onnx; the summary names each, from the written bytes, not from a list."""
    result = bnfix.patch(NANO_P, NANO_M)
    devs = {d.runtime: d for d in result.deviations()}
    assert set(devs) == {"nvcaffe", "nvcaffe-0.16.1", "caffe2onnx", "merge_bn"}
    assert all(d.worst is not None and d.worst > 1e-3 for d in devs.values())
    assert "not exact in caffe2onnx: error up to" in _render(result)
    portable = bnfix.patch(NANO_P, NANO_M, target="portable")
    assert {d.runtime for d in portable.deviations()} == {"nvcaffe-0.16.1"}  # the one it documents as not covered
    assert report.pair_dict(portable)["deviations"][0]["runtime"] == "nvcaffe-0.16.1"


def test_skip_reasons_and_up_to_date_rows(tmp_path):
    pp, mp = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"
    bnfix.patch(pp, mp).save(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    again = bnfix.patch(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    text = _render(again)
    assert text.count("up to date (bnfix markers agree)") == 23
    assert "worst error n/a → n/a" in text
    layer = report.pair_dict(again)["layers"][0]
    assert layer["status"] == "up to date" and layer["err_before"] is None and layer["err_after"] is None
    assert report.pair_line(again).endswith("a.caffemodel: up to date of 23 layers")
    other = bnfix.patch(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", source="opencv")
    assert "skipped: patched by bnfix (eps fit to sqrt(var) + 1e-06, eps 1e-06)" in _render(other)


def test_pair_line_and_totals():
    result = bnfix.patch(SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel")
    assert report.pair_line(result) == (f"{SAMPLE / 'yoloface-50k.prototxt'} + yoloface-50k.caffemodel: "
                                        "23 patched of 23 layers; error 2.1e-02 → 8.5e-08 (not exact in nvcaffe, nvcaffe-0.16.1, caffe2onnx, merge_bn)")
    t = report.Totals().add(result.layers).add(result.layers)
    assert report.run_line(t, failed=1, unpaired=2) == (
        "total: 2 pair(s), 46 layers patched, 0 reverted, 0 up to date, 0 skipped; worst error "
        "2.1e-02 → 8.5e-08; 1 pair(s) failed, 2 file(s) unpaired")
