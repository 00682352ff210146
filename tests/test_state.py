"""Whether a pair is patched is decided from both files: every combination (issue 8, point 1).

A patched prototxt beside a caffemodel bnfix did not write for it must never be "up to date"
(nor --check 0); statistics that are provably raw are refitted; anything bnfix cannot be sure
of is one error line naming both files and how to recover. Every message is pinned.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import caffe_proto as cp
import numpy as np
import pytest
from conftest import SAMPLE

import bnfix
from bnfix import marker
from bnfix.cli import main

P, M = SAMPLE / "yoloface-50k.prototxt", SAMPLE / "yoloface-50k.caffemodel"


@pytest.fixture
def files(tmp_path):
    """original (o.*), patched (p.*), patched for another source (q.*), retrained (r.caffemodel)."""
    shutil.copy(P, tmp_path / "o.prototxt")
    shutil.copy(M, tmp_path / "o.caffemodel")
    bnfix.patch(P, M).save(tmp_path / "p.prototxt", tmp_path / "p.caffemodel")
    bnfix.patch(P, M, source="opencv").save(tmp_path / "q.prototxt", tmp_path / "q.caffemodel")
    net = cp.parse(M.read_bytes())
    rng = np.random.default_rng(5)
    for layer in net.layer:
        if layer.type == "BatchNorm":  # "retrained": new statistics, same network
            var = np.array(layer.blobs[1].data, np.float32) * rng.uniform(0.5, 2.0, len(layer.blobs[1].data))
            del layer.blobs[1].data[:]
            layer.blobs[1].data.extend(var.astype(np.float32).tolist())
    (tmp_path / "r.caffemodel").write_bytes(net.SerializeToString())
    return tmp_path


def strip_records(path: Path) -> bytes:
    """The caffemodel without bnfix's records, every other byte as it was (a tool that drops
    unknown fields when it re-saves a model)."""
    from bnfix import caffemodel

    data = path.read_bytes()
    keep = [data[sp.start:sp.end] for sp in caffemodel.fields(data, 0, len(data)) if sp.number != marker.RECORD_FIELD]
    return b"".join(keep)


def as_bnfix_1(path: Path) -> bytes:
    """A bnfix 2 output as bnfix 1.0 wrote it: no records, and eps 1e-6 in every BatchNorm's
    stored batch_norm_param (1.0's caffemodel-side trace)."""
    from bnfix import caffemodel
    from bnfix.formulas import f32

    data = strip_records(path)
    tmp = path.with_name("stripped.caffemodel")
    tmp.write_bytes(data)
    out, pos = [], 0
    with caffemodel.Model(tmp) as m:
        for layer in m.layers:
            if layer.type == "BatchNorm":
                e = m.entry(layer)
                out += [data[pos:layer.start], e.rebuilt({}, {caffemodel.LAYER_BN_PARAM: e.edited_bn_param(eps=f32(1e-6))})]
                pos = layer.end
    tmp.unlink()
    return b"".join(out) + data[pos:]


def _check(capsys, pp: Path, mp: Path) -> tuple[int, str]:
    code = main([str(pp), str(mp), "--check", "-q"])
    return code, capsys.readouterr().err


def test_unpatched_needs_work_and_patched_is_up_to_date(files, capsys):
    assert _check(capsys, files / "o.prototxt", files / "o.caffemodel") == (1, "")
    assert _check(capsys, files / "p.prototxt", files / "p.caffemodel") == (0, "")
    assert all(l.status.value == "up to date" for l in bnfix.patch(files / "p.prototxt", files / "p.caffemodel").layers)


def test_patched_prototxt_beside_the_original_caffemodel_is_refitted(files, capsys):
    """An interrupted save (prototxt first) or the original put back: never "up to date"."""
    assert _check(capsys, files / "p.prototxt", files / "o.caffemodel") == (1, "")
    result = bnfix.patch(files / "p.prototxt", files / "o.caffemodel")
    assert all(l.status.value == "patched" and l.warning for l in result.layers)
    assert ("statistics refitted under the existing bnfix marker: the caffemodel still holds the original "
            "statistics (an interrupted save, or the original put back)") in result.layers[0].changes
    result.save(files / "x.prototxt", files / "x.caffemodel")
    assert (files / "x.prototxt").read_bytes() == (files / "p.prototxt").read_bytes()
    assert (files / "x.caffemodel").read_bytes() == (files / "p.caffemodel").read_bytes()


def test_patched_prototxt_beside_retrained_weights_refits_them(files, capsys):
    assert _check(capsys, files / "p.prototxt", files / "r.caffemodel") == (1, "")
    result = bnfix.patch(files / "p.prototxt", files / "r.caffemodel")
    assert "the caffemodel holds other statistics bnfix never wrote (retrained weights or another model)" in \
        result.layers[0].changes[1]
    result.save(files / "x.prototxt", files / "x.caffemodel")
    direct = bnfix.patch(files / "o.prototxt", files / "r.caffemodel")
    direct.save(files / "y.prototxt", files / "y.caffemodel")
    assert (files / "x.prototxt").read_bytes() == (files / "y.prototxt").read_bytes()  # the same as a fresh patch
    assert (files / "x.caffemodel").read_bytes() == (files / "y.caffemodel").read_bytes()
    assert _check(capsys, files / "x.prototxt", files / "x.caffemodel") == (0, "")


def test_revert_of_a_patched_prototxt_beside_raw_statistics_touches_only_the_prototxt(files):
    result = bnfix.revert(files / "p.prototxt", files / "o.caffemodel")
    assert all(l.status.value == "reverted" and l.warning for l in result.layers)
    result.save(files / "x.prototxt", files / "x.caffemodel")
    assert (files / "x.prototxt").read_bytes() == P.read_bytes()
    assert (files / "x.caffemodel").read_bytes() == M.read_bytes()  # not "restored" twice


def _one_error(capsys, *args: str) -> str:
    code = main([*args, "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.splitlines()
    return line


def test_patched_caffemodel_beside_an_unpatched_prototxt_is_refused(files, capsys):
    line = _one_error(capsys, str(files / "o.prototxt"), str(files / "p.caffemodel"), "-o", str(files / "out"))
    stats = re.search(r"stats ([0-9a-f]{12})", line)
    assert stats and line == (
        f"bnfix: error: {files}/p.caffemodel: layer 'layer1-bn' holds statistics bnfix wrote (eps fit, stats "
        f"{stats[1]}) but {files}/o.prototxt has no bnfix marker for it: the files come from different runs; "
        "use the prototxt bnfix wrote with this caffemodel, or restore both files from the same run (e.g. "
        "o.prototxt.orig and p.caffemodel.orig after --in-place) and run bnfix again")
    assert not (files / "out").exists()
    assert main([str(files / "o.prototxt"), str(files / "p.caffemodel"), "--check", "-q"]) == 2


def test_a_pair_mixed_from_two_patches_is_refused(files, capsys):
    line = _one_error(capsys, str(files / "q.prototxt"), str(files / "p.caffemodel"), "--check")
    assert line.startswith(f"bnfix: error: {files}/q.prototxt and {files}/p.caffemodel: layer 'layer1-bn' was "
                           "patched by two different bnfix runs (stats ")
    assert line.endswith("restore both files from the same run (e.g. q.prototxt.orig and p.caffemodel.orig "
                         "after --in-place) and run bnfix again")


def test_statistics_changed_after_bnfix_wrote_them_are_refused(files, capsys):
    net = cp.parse((files / "p.caffemodel").read_bytes())
    bn = next(l for l in net.layer if l.type == "BatchNorm")
    bn.blobs[0].data[0] += 1.0  # someone edited the mean; bnfix's record (an unknown field) stays
    (files / "e.caffemodel").write_bytes(net.SerializeToString())
    line = _one_error(capsys, str(files / "p.prototxt"), str(files / "e.caffemodel"), "--check")
    assert "layer 'layer1-bn': its statistics changed after bnfix wrote them (stats " in line


def test_a_caffemodel_whose_record_was_dropped_by_a_tool_is_still_recognised(files, capsys):
    """A tool that re-saves the caffemodel without unknown fields keeps the statistics: the
    prototxt's digest alone then proves they are what bnfix wrote."""
    (files / "d.caffemodel").write_bytes(strip_records(files / "p.caffemodel"))
    assert _check(capsys, files / "p.prototxt", files / "d.caffemodel") == (0, "")


def test_a_corrupt_marker_or_record_names_the_file_and_layer(files, capsys):
    text = (files / "p.prototxt").read_text().replace("[undo eps=none]", "[undo eps=abc]", 1)
    (files / "c.prototxt").write_text(text)
    line = _one_error(capsys, str(files / "c.prototxt"), str(files / "p.caffemodel"), "--check")
    assert re.fullmatch(rf"bnfix: error: {files}/c\.prototxt:\d+:\d+: layer 'layer1-bn': corrupt bnfix marker: "
                        r"undo entry 'eps=abc'", line), line
    raw = (files / "p.caffemodel").read_bytes().replace(b"eps 1e-06, stats", b"eps 1e-0x, stats", 1)
    (files / "c.caffemodel").write_bytes(raw)  # same length: the protobuf framing stays valid
    line = _one_error(capsys, str(files / "p.prototxt"), str(files / "c.caffemodel"), "--check")
    assert line == (f"bnfix: error: {files}/c.caffemodel: layer 'layer1-bn': corrupt bnfix marker: formula "
                    "'sqrt(var) + 1e-06', eps '1e-0x'")


def test_bnfix_1_markers_are_upgraded_not_trusted_blindly(files, capsys):
    """A pair patched by bnfix 1.0 (marker without digests, eps in the caffemodel's stored
    parameters, no record) is recognised: --check asks for the upgrade, a run writes the
    digests and the record and changes no statistic, and it still reverts."""
    text = re.sub(r"# bnfix: eps fit to (.*?), eps (\S+), stats \w+ from \w+ \[undo eps=none\]",
                  r"# bnfix: fitted to \1, eps \2 [undo eps=none model.eps=none]", (files / "p.prototxt").read_text())
    assert text.count("fitted to") == 23
    (files / "v1.prototxt").write_text(text)
    (files / "v1.caffemodel").write_bytes(as_bnfix_1(files / "p.caffemodel"))
    assert _check(capsys, files / "v1.prototxt", files / "v1.caffemodel") == (1, "")
    result = bnfix.patch(files / "v1.prototxt", files / "v1.caffemodel")
    assert all("bnfix 1.0 marker upgraded" in l.changes for l in result.layers)
    result.save(files / "u.prototxt", files / "u.caffemodel")
    assert (files / "u.prototxt").read_bytes() == (files / "p.prototxt").read_bytes()
    upgraded = (files / "u.caffemodel").read_bytes()
    assert strip_records(files / "u.caffemodel") == (files / "v1.caffemodel").read_bytes()  # statistics kept
    assert upgraded.count(b"model.eps=none") == 23  # the record keeps what 1.0 replaced, for revert
    assert _check(capsys, files / "u.prototxt", files / "u.caffemodel") == (0, "")
    back = bnfix.revert(files / "v1.prototxt", files / "v1.caffemodel")
    back.save(files / "b.prototxt", files / "b.caffemodel")
    assert (files / "b.prototxt").read_bytes() == P.read_bytes()
    assert (files / "b.caffemodel").read_bytes() == M.read_bytes()
    # A 1.0 marker beside a caffemodel without its eps: raw statistics, refitted.
    assert "never patched by bnfix 1.0" in bnfix.patch(files / "v1.prototxt", files / "o.caffemodel").layers[0].changes[1]


def test_marker_digest_is_of_the_statistics_written(files):
    doc = bnfix.patch(files / "p.prototxt", files / "p.caffemodel")
    text = (files / "p.prototxt").read_text()
    stats = re.findall(r"stats ([0-9a-f]{12}) from ([0-9a-f]{12})", text)
    assert len(stats) == 23 and all(a != b for a, b in stats)
    assert marker.DIGEST_CHARS == 12 and doc.needs_work is False


def test_a_scale_fit_whose_scale_layer_is_gone_is_refused_not_corrected_twice(files, capsys):
    """The scale strategy's digest covers the Scale's gamma: with that Scale renamed away, the
    BatchNorm blobs alone would look raw and be corrected a second time on the folded gamma."""
    bnfix.patch(P, M, strategy="scale").save(files / "s.prototxt", files / "s.caffemodel")
    text = (files / "s.prototxt").read_text().replace('name: "layer1-scale"', 'name: "renamed"', 1)
    (files / "n.prototxt").write_text(text)
    for extra in ([], ["--revert"], ["--force"]):
        line = _one_error(capsys, str(files / "n.prototxt"), str(files / "s.caffemodel"), "-o",
                          str(files / "out"), *extra)
        assert line == (
            f"bnfix: error: {files}/n.prototxt: layer 'layer1-bn' was patched by folding into its Scale layer, "
            "but that Scale is no longer found (Scale layer 'renamed' has no Scale entry in the caffemodel): "
            "undo the prototxt edit, or restore both files from the same run (e.g. n.prototxt.orig and "
            "s.caffemodel.orig after --in-place) and run bnfix again"), extra
    assert not (files / "out").exists()
