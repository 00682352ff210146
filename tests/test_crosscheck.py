"""--darknet-weights/--darknet-cfg: writer detection, source warnings, per-layer statistics check."""

from __future__ import annotations

import json
from collections import Counter

import caffe_proto as cp
import numpy as np
import pytest
from conftest import NANO

import bnfix
from bnfix import crosscheck as cc
from bnfix import semantics as sem
from bnfix.cli import main

P, M = NANO / "MobileNetV2-YOLOv3-Nano-voc.prototxt", NANO / "MobileNetV2-YOLOv3-Nano-voc.caffemodel"
W, CFG = NANO / "MobileNetV2-YOLOv3-Nano-voc.weights", NANO / "MobileNetV2-YOLOv3-Nano-voc.cfg"


def test_real_pair_all_57_layers_match_exactly():
    r = cc.crosscheck(P, M, W, CFG)
    assert (r.header.major, r.header.minor, r.header.revision, r.header.header_size) == (0, 2, 5, 20)
    assert r.header.writer == "AlexeyAB/hank-ai"
    assert len(r.layers) == 57 and r.faults == 0
    assert Counter(l.status for l in r.layers) == {cc.EXACT: 57}
    assert [l.darknet_index for l in r.layers][:3] == [0, 1, 2]


def test_source_warning_names_the_preset_that_fits():
    header = cc.crosscheck(P, M, W).header
    warn = cc.source_warning(header, sem.PRESETS["pjreddie-cpu"])
    assert "--source alexeyab fits" in warn
    assert cc.source_warning(header, sem.PRESETS["alexeyab"]) == ""
    assert cc.source_warning(header, sem.PRESETS["pjreddie-gpu"]) == ""  # the same formula
    pj = header.__class__(0, 2, 0, 1, 20)
    assert "pjreddie-cpu or pjreddie-gpu fits" in cc.source_warning(pj, sem.PRESETS["opencv"])
    assert cc.source_warning(pj, sem.PRESETS["pjreddie-cpu"]) == ""


def test_patched_model_still_matches_through_its_marker(tmp_path):
    bnfix.patch(P, M).save(tmp_path / "p.prototxt", tmp_path / "p.caffemodel")
    r = cc.crosscheck(tmp_path / "p.prototxt", tmp_path / "p.caffemodel", W, CFG)
    assert r.faults == 0
    assert Counter(l.status for l in r.layers) == {cc.RECOVERED: 57}


def _tampered(tmp_path, edit) -> tuple:
    net = cp.parse(M.read_bytes())
    bns = [l for l in net.layer if l.type == "BatchNorm"]
    edit(bns)
    out = tmp_path / "t.caffemodel"
    out.write_bytes(net.SerializeToString())
    return cc.crosscheck(P, out, W, CFG), bns


def test_converter_faults_are_flagged(tmp_path):
    def edit(bns):
        bns[5].blobs[1].data[0] *= 1.5  # a wrong variance
        bns[9].blobs[2].data[0] = 0.0  # the s = 0 converter bug
        same = [b for b in bns if len(b.blobs[0].data) == len(bns[20].blobs[0].data) and b is not bns[20]]
        a, b = bns[20], same[-1]  # two layers with the same channel count, swapped
        for i in (0, 1):
            da, db = list(a.blobs[i].data), list(b.blobs[i].data)
            a.blobs[i].ClearField("data"), b.blobs[i].ClearField("data")
            a.blobs[i].data.extend(db), b.blobs[i].data.extend(da)

    r, bns = _tampered(tmp_path, edit)
    by_name = {l.caffe: l for l in r.layers}
    assert by_name[bns[5].name].status == cc.MISMATCH
    assert by_name[bns[5].name].max_rel_var == pytest.approx(0.5, rel=1e-6)
    assert by_name[bns[9].name].status == "scale factor 0"
    assert by_name[bns[20].name].status == cc.OUT_OF_ORDER
    assert "Darknet layer" in by_name[bns[20].name].note
    assert r.faults == 4


def test_cli_reports_header_layers_and_warning(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main([str(P), str(M), "--dry-run", "--darknet-weights", str(W), "--darknet-cfg", str(CFG),
                 "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "57 of 57 BatchNorm layers match" in text
    assert "version 0.2.5 (AlexeyAB/hank-ai)" in text
    assert "--source alexeyab fits" in text
    d = json.loads(out.read_text())["pairs"][0]["darknet"]
    assert d["header"] == {"major": 0, "minor": 2, "revision": 5, "seen": d["header"]["seen"], "header_size": 20}
    assert d["writer"] == "AlexeyAB/hank-ai" and d["faults"] == 0 and len(d["layers"]) == 57
    assert all(l["ok"] and l["status"] == "exact" for l in d["layers"])


def test_cli_no_warning_when_source_fits(capsys):
    assert main([str(P), str(M), "--dry-run", "--source", "alexeyab", "--darknet-weights", str(W)]) == 0
    out = capsys.readouterr().out
    assert "version 0.2.5" in out and "warning" not in out


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "trunc.weights", "truncated"),
    (lambda d: d / "long.weights", "unexpected trailing bytes"),
    (lambda d: d / "short.weights", "weights"),
])
def test_bad_weights_exit_2(tmp_path, capsys, make, message):
    data = W.read_bytes()
    (tmp_path / "trunc.weights").write_bytes(data[:1_000_000])
    (tmp_path / "long.weights").write_bytes(data + b"\0" * 8)
    (tmp_path / "short.weights").write_bytes(data[:10])
    target = make(tmp_path)
    code = main([str(P), str(M), "-o", str(tmp_path / "out"), "--darknet-weights", str(target),
                 "--darknet-cfg", str(CFG)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bnfix: error: ") and target.name in err and message in err
    assert not (tmp_path / "out").exists()


def test_mismatched_cfg_exit_2(tmp_path, capsys):
    cfg = tmp_path / "other.cfg"
    cfg.write_text(CFG.read_text().replace("filters=16", "filters=24", 1))
    assert main([str(P), str(M), "--dry-run", "--darknet-weights", str(W), "--darknet-cfg", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (err.startswith("bnfix: error: ") and "other.cfg" in err) or "weights" in err


def test_usage_errors(capsys):
    assert main([str(P), str(M), "--darknet-cfg", str(CFG)]) == 2
    assert "--darknet-cfg needs --darknet-weights" in capsys.readouterr().err
    assert main([str(P), str(M), str(P), str(M), "--darknet-weights", str(W)]) == 2
    assert "one pair at a time" in capsys.readouterr().err


def test_effective_statistics_with_scale_factor(tmp_path):
    """A Caffe model storing stats times s (999.98) matches Darknet's through blob/s."""
    from bnfix import darknet

    _, _dn = darknet.read_bn_layers(CFG, W)
    s = np.float32(999.98236)

    def edit(bns):
        for b in bns:
            for i in (0, 1):
                vals = (np.array(b.blobs[i].data, np.float64) * float(s)).astype(np.float32)
                b.blobs[i].ClearField("data")
                b.blobs[i].data.extend(vals.tolist())
            b.blobs[2].data[0] = float(s)

    r, _ = _tampered(tmp_path, edit)
    assert r.faults == 0
    assert {l.status for l in r.layers} == {cc.ROUNDING}
