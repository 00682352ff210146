"""End-to-end tests of the ``bnfix`` command: bad input, options, idempotency and the patch cases.

Most runs call ``bnfix.cli.main([...])`` in-process (fast, output via ``capsys``); a few run
``python -m bnfix`` in a subprocess (or under a pseudo-terminal) to prove what a real user sees.
Models are either copies of the real samples or tiny ones built with the protobuf runtime
(``caffe_proto``), and outputs are decoded with that runtime, not with bnfix's own walker.

Every bad-input case checks the same contract: exit 2, exactly one ``bnfix: error:`` line naming
the file, no traceback, and the directory byte-identical afterwards (nothing new, no temp file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import caffe_proto as cp
import numpy as np
import pytest
from conftest import run_in_pty

import bnfix
from bnfix.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE_P = REPO / "samples" / "yoloface-50k.prototxt"
SAMPLE_M = REPO / "samples" / "yoloface-50k.caffemodel"
SAMPLE_BN = 23
NANO_DIR = REPO / "tests" / "data" / "mobilenetv2-yolov3-nano-voc"
NANO_P = NANO_DIR / "MobileNetV2-YOLOv3-Nano-voc.prototxt"
NANO_M = NANO_DIR / "MobileNetV2-YOLOv3-Nano-voc.caffemodel"
NANO_BN = 57

ANSI = "\x1b["
LAYER_KEYS = {
    "name", "channels", "status", "strategy", "changes", "reason", "warning", "eps_before", "eps_after",
    "changed", "max_rel_change", "negative_channels", "err_before", "err_after", "worst_channel", "scale_layer",
}


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch, tmp_path):
    """Run inside tmp_path; no colour or width settings leak in from the developer's shell.

    fsync is a no-op for in-process runs: durability cannot be observed here, and on a busy disk
    each call can stall for seconds (subprocess runs still fsync for real)."""
    monkeypatch.chdir(tmp_path)
    for var in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file (hidden ones included) and directory under root, with file contents' sha256."""
    def what(p: Path) -> str:
        if p.is_dir():
            return "<dir>"
        return sha(p) if p.is_file() else "<special>"  # reading a FIFO would block

    return {str(p.relative_to(root)): what(p) for p in sorted(root.rglob("*"))}


def run(capsys, *args) -> tuple[int, str, str]:
    """``main`` in-process; paths under the current directory are passed relative to it, so that
    messages are checked against what the user typed, not against pytest's tmp_path (whose name
    holds the test's name and would match almost any needle)."""
    code = main([_rel(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _rel(arg) -> str:
    if isinstance(arg, Path) and arg.is_absolute():
        try:
            return str(arg.relative_to(Path.cwd())) or "."
        except ValueError:
            pass
    return str(arg)


def run_proc(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m bnfix`` in a real process (in the current directory unless ``cwd``)."""
    argv = [str(a) for a in args] if cwd else [_rel(a) for a in args]
    return subprocess.run([sys.executable, "-m", "bnfix", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def one_error(err: str, *needles: str) -> str:
    """stderr is exactly one ``bnfix: error:`` line containing every needle; return it."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("bnfix: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


def usage_error(err: str, *needles: str) -> str:
    """argparse style: usage lines plus exactly one ``bnfix: error:`` line."""
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("bnfix: error:")]
    assert len(errors) == 1, err
    others = [l for l in err.splitlines() if not l.startswith("bnfix: error:")]
    assert all(l.startswith("usage:") or l.startswith(" ") for l in others), err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def copy_sample(d: Path, stem: str = "yoloface-50k") -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    pp, mp = d / f"{stem}.prototxt", d / f"{stem}.caffemodel"
    shutil.copyfile(SAMPLE_P, pp)
    shutil.copyfile(SAMPLE_M, mp)
    return pp, mp


def write_pair(d: Path, text: str, model: bytes, name: str = "m") -> tuple[Path, Path]:
    pp, mp = d / f"{name}.prototxt", d / f"{name}.caffemodel"
    pp.write_text(text)
    mp.write_bytes(model)
    return pp, mp


def layers_by_name(model: Path) -> dict[str, object]:
    """The caffemodel decoded by the protobuf runtime: name -> LayerParameter."""
    return {l.name: l for l in cp.parse(model.read_bytes()).layer}


def blob(layer, i: int) -> np.ndarray:
    return np.asarray(layer.blobs[i].data, np.float32)


def layer_blocks(text: str) -> list[str]:
    """Top-level ``layer { ... }`` blocks of a prototxt written with a closing ``}`` at column 0."""
    return re.findall(r"^layer \{.*?^\}", text, re.M | re.S)


def block_named(text: str, name: str) -> list[str]:
    return [b for b in layer_blocks(text) if f'name: "{name}"' in b]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which are not JSON (jq and JSON.parse reject them)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def json_run(capsys, *args) -> tuple[int, dict, str]:
    code, out, err = run(capsys, *args, "--json", "-", "-q")
    return code, strict_json(out), err


def darknet_cpu(var) -> np.ndarray:
    return np.sqrt(np.asarray(var, np.float64)) + 1e-6


def two_bn_model(var2, s2: float = 1.0) -> bytes:
    """conv + bn1 (healthy) + bn2 (the layer under test), as the converter would write them."""
    return cp.model_bytes(
        cp.conv_layer("conv", np.ones(4)),
        cp.bn_layer("bn1", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
        cp.bn_layer("bn2", np.zeros(len(var2)), var2, s2),
    )


TWO_BN_PROTOTXT = cp.bn_prototxt(["bn1", "bn2"])


# -- bad input: exit 2, one error line, nothing written, inputs untouched --------------------


def _truncated(where: str):
    """A copy of the sample cut at a structural point found with the protobuf runtime."""

    def make(d: Path, pp: Path, mp: Path):
        data = mp.read_bytes()
        name = b"layer1-bn"
        idx = data.find(b"\x0a" + bytes([len(name)]) + name)  # LayerParameter.name, first field
        assert idx > 4 and data[idx - 4 : idx - 2] == b"\xa2\x06"  # key of NetParameter.layer (100)
        var = cp.parse(data).layer
        var = next(l for l in var if l.name == "layer1-bn").blobs[1].data
        floats = data.find(np.asarray(var, "<f4").tobytes())
        assert floats > idx
        cut = {"layer-header": idx - 1, "layer-name": idx + 4, "blob-floats": floats + 13,
               "one-byte-short": len(data) - 1}[where]
        bad = d / "cut.caffemodel"
        bad.write_bytes(data[:cut])
        return [pp, bad], ["cut.caffemodel", "not a valid caffemodel"]

    return make


def _bad_model(content: bytes):
    def make(d: Path, pp: Path, mp: Path):
        bad = d / "bad.caffemodel"
        bad.write_bytes(content)
        return [pp, bad], ["bad.caffemodel"]

    return make


def _missing(which: int):
    def make(d: Path, pp: Path, mp: Path):
        args = [pp, mp]
        args[which] = d / ("nope.prototxt", "nope.caffemodel")[which]
        return args, [args[which].name]

    return make


def _not_regular(which: int, kind: str):
    """A FIFO (which would block a plain open forever) or a device such as /dev/zero (which
    never ends) where a file is expected: refused at once, naming what it is."""
    def make(d: Path, pp: Path, mp: Path):
        args: list = [pp, mp]
        if kind == "fifo":
            fifo = d / "pipe.prototxt"
            os.mkfifo(fifo)
            args[which] = fifo
            return args, ["pipe.prototxt: is a FIFO, not a regular file"]
        args[which] = Path("/dev/zero")
        return args, ["/dev/zero: is a character device, not a regular file"]

    return make


def _prototxt_edit(edit, where):
    """A prototxt changed by ``edit(text)``; ``where(text)`` gives the (line, col) to be named."""

    def make(d: Path, pp: Path, mp: Path):
        text = edit(pp.read_text())
        bad = d / "bad.prototxt"
        bad.write_text(text)
        line, col = where(text)
        return [bad, mp], [f"bad.prototxt:{line}:{col}"]

    return make


def _line_col(text: str, needle: str, offset_in_needle: int = 0) -> tuple[int, int]:
    pos = text.index(needle) + offset_in_needle
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _with_eps(value: str):
    return _prototxt_edit(
        lambda t: t.replace("use_global_stats: true", f"use_global_stats: true\n        eps: {value}", 1),
        lambda t: _line_col(t, f"eps: {value}", len("eps: ")),
    )


def _ghost_layer(d: Path, pp: Path, mp: Path):
    bad = d / "ghost.prototxt"
    bad.write_text(pp.read_text() + 'layer {\n  name: "ghost-bn"\n  type: "BatchNorm"\n}\n')
    return [bad, mp], [mp.name, "'ghost-bn'"]


def _corrupt_variance(value: float, channel: int):
    def make(d: Path, pp: Path, mp: Path):
        var = [1.0, 2.0, 3.0, 4.0]
        var[channel] = value
        p, m = write_pair(d, TWO_BN_PROTOTXT, two_bn_model(var), "corrupt")
        return [p, m], ["corrupt.caffemodel", "'bn2'", f"channel {channel}"]

    return make


def _output_is_input_dir(spelling: str):
    def make(d: Path, pp: Path, mp: Path):
        out = {"same": d, "dotdot": d / "x" / ".."}[spelling]
        return [pp, mp, "-o", out], [pp.name]

    return make


def _output_dir_is_a_file(d: Path, pp: Path, mp: Path):
    f = d / "notadir"
    f.write_text("x")
    return [pp, mp, "-o", f], ["notadir"]


def _in_place_bad(d: Path, pp: Path, mp: Path):
    bad = d / "bad.caffemodel"
    bad.write_bytes(mp.read_bytes()[:-1])
    return [pp, bad, "--in-place"], ["bad.caffemodel"]


def _nested_out_bad(d: Path, pp: Path, mp: Path):
    args, needles = _corrupt_variance(float("nan"), 0)(d, pp, mp)
    return args + ["-o", d / "new" / "dir"], needles  # the directory must not be created either


BAD_INPUT = {
    "missing-prototxt": _missing(0),
    "missing-caffemodel": _missing(1),
    "fifo-as-prototxt": _not_regular(0, "fifo"),
    "fifo-as-caffemodel": _not_regular(1, "fifo"),
    "dev-zero-as-caffemodel": _not_regular(1, "device"),
    "truncated-in-layer-header": _truncated("layer-header"),
    "truncated-in-layer-name": _truncated("layer-name"),
    "truncated-in-blob-floats": _truncated("blob-floats"),
    "truncated-one-byte-short": _truncated("one-byte-short"),
    "random-bytes": _bad_model(np.random.default_rng(1234).bytes(4096)),
    "text-file-as-caffemodel": _bad_model(b"this is not a model\nat all\n"),
    "empty-caffemodel": _bad_model(b""),
    "unclosed-brace": _prototxt_edit(lambda t: t + 'layer {\n  name: "x"\n',
                                     lambda t: _line_col(t, 'layer {\n  name: "x"', len("layer "))),
    "stray-brace": _prototxt_edit(lambda t: t + "}\n", lambda t: (t.count("\n"), 1)),
    "eps-not-a-number": _with_eps("abc"),
    "eps-quoted-string": _with_eps('"1e-6"'),
    "bn-layer-missing-from-caffemodel": _ghost_layer,
    "variance-nan": _corrupt_variance(float("nan"), 2),
    "variance-inf": _corrupt_variance(float("inf"), 1),
    "variance-negative": _corrupt_variance(-0.5, 3),
    "output-dir-is-input-dir": _output_is_input_dir("same"),
    "output-dir-is-input-dir-dotdot": _output_is_input_dir("dotdot"),
    "output-dir-is-a-file": _output_dir_is_a_file,
    "in-place-with-bad-input": _in_place_bad,
    "nested-output-dir-with-bad-input": _nested_out_bad,
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input(tmp_path, capsys, case):
    pp, mp = copy_sample(tmp_path)
    args, needles = case(tmp_path, pp, mp)
    before = snapshot(tmp_path)
    code, _out, err = run(capsys, *args)
    assert code == 2
    one_error(err, *needles)
    assert snapshot(tmp_path) == before  # nothing new (no output, no .bnfix-tmp, no .orig), inputs intact


def test_bad_prototxt_messages_name_layer(tmp_path, capsys):
    """eps errors name the layer as well as file:line:col."""
    pp, mp = copy_sample(tmp_path)
    args, needles = _with_eps("abc")(tmp_path, pp, mp)
    code, _, err = run(capsys, *args)
    assert code == 2
    one_error(err, *needles, "layer1-bn", "abc")


def test_swapped_arguments(tmp_path, capsys):
    """Caffemodel first: refused with a message that says the arguments look swapped (it used to say
    only 'not a text prototxt (binary data; is it a caffemodel?)')."""
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, mp, pp)
    assert code == 2
    assert "swapped" in one_error(err, mp.name)
    assert snapshot(tmp_path) == before


def test_corrupt_variance_message_shows_plain_number(tmp_path, capsys):
    """Regression: under numpy 2 the message said 'variance is np.float32(nan)'."""
    pp, mp = copy_sample(tmp_path)
    args, _ = _corrupt_variance(float("nan"), 2)(tmp_path, pp, mp)
    code, _, err = run(capsys, *args)
    assert code == 2
    line = one_error(err, "'bn2'", "channel 2")
    assert "np." not in line and "nan" in line


def test_json_path_equal_to_an_input_is_refused(tmp_path, capsys):
    """Regression: the JSON report used to overwrite the input caffemodel (exit 0)."""
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, pp, mp, "--json", mp, "-q")
    assert sha(mp) == before[mp.name]
    assert code == 2
    one_error(err, mp.name)
    assert snapshot(tmp_path) == before


def test_a_json_report_that_cannot_be_written_does_not_stop_the_pairs(tmp_path, capsys):
    """The report path's directory is a file: one error line, exit 2, the pairs still fixed."""
    pp, mp = copy_sample(tmp_path)
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, pp, mp, "-o", tmp_path / "out", "--json", tmp_path / "file" / "r.json", "-q")
    assert code == 2
    assert err == "bnfix: error: file/r.json: cannot write: Not a directory\n"
    assert run(capsys, tmp_path / "out" / pp.name, tmp_path / "out" / mp.name, "--check")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file", mp.name, "out", pp.name])


def test_two_pairs_colliding_in_output_dir(tmp_path, capsys):
    """Regression: the second pair used to overwrite the first pair's outputs silently (exit 0)."""
    a = copy_sample(tmp_path / "a")
    b = copy_sample(tmp_path / "b")
    text = b[0].read_text().replace("use_global_stats: true", "use_global_stats: true\n        eps: 1e-06")
    b[0].write_text(text)  # pair b is left alone (ambiguous eps), so its output is a plain copy
    code, _, err = run(capsys, *a, *b, "-o", tmp_path / "out", "-q")
    assert "# bnfix: eps fit" in (tmp_path / "out" / a[0].name).read_text()  # pair a's patched output survives
    assert code == 2
    one_error(err, "yoloface-50k.", "already written")


@pytest.mark.parametrize("args,line", [
    (["only-one.prototxt"], "bnfix: error: only-one.prototxt: no such file"),
    (["a.prototxt", "a.caffemodel", "b.prototxt"], "bnfix: error: a.prototxt: no such file"),
], ids=["one-missing-file", "a-pair-and-a-missing-file"])
def test_missing_files_are_one_error_each(tmp_path, capsys, args, line):
    code, _out, err = run(capsys, *args)
    assert code == 2
    assert err.splitlines()[0] == line
    assert all(l.startswith("bnfix: error: ") for l in err.splitlines())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needles", [
    (["a.prototxt", "a.caffemodel", "--in-place", "-o", "out"], ["--in-place"]),
    (["a.prototxt", "a.caffemodel", "--check", "--dry-run"], ["--dry-run"]),
    (["a.prototxt", "a.caffemodel", "--color", "rainbow"], ["rainbow"]),
    (["a.prototxt", "a.caffemodel", "--target-eps", "abc"], ["abc"]),
    ([], ["required"]),
], ids=["in-place-with-o", "check-with-dry-run", "bad-color", "target-eps-abc", "no-files"])
def test_usage_errors(tmp_path, capsys, args, needles):
    code, out, err = run(capsys, *args)
    assert code == 2
    usage_error(err, *needles)
    assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needles", [
    (["--source", "pjreddie-tpu"], ["pjreddie-tpu"]),
    (["--source", "sqrt(var+abc)"], ["sqrt(var+abc)"]),
    (["--target-eps=-1e-6"], ["target eps"]),
    (["--target-eps", "nan"], ["target eps"]),
], ids=["unknown-preset", "bad-formula", "negative-target-eps", "nan-target-eps"])
def test_bad_option_values(tmp_path, capsys, args, needles):
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, pp, mp, *args)
    assert code == 2
    one_error(err, *needles)
    assert snapshot(tmp_path) == before


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    pp, mp = copy_sample(tmp_path)
    args, needles = BAD_INPUT["truncated-in-blob-floats"](tmp_path, pp, mp)
    before = snapshot(tmp_path)
    proc = run_proc(*args)
    assert proc.returncode == 2
    one_error(proc.stderr, *needles)
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


def test_many_broken_pairs_in_a_real_process(tmp_path):
    """One error line per broken pair, in order, from a real process; nothing written."""
    pp, mp = copy_sample(tmp_path)
    cases = ["variance-nan", "eps-not-a-number", "missing-caffemodel", "bn-layer-missing-from-caffemodel"]
    args, expected = [], []
    for case in cases:
        a, needles = BAD_INPUT[case](tmp_path, pp, mp)
        args += a
        expected.append(needles)
    before = snapshot(tmp_path)
    proc = run_proc(*args, "-q")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(cases), proc.stderr
    for line, needles in zip(lines, expected):
        one_error(line + "\n", *needles)
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


# -- output locations ------------------------------------------------------------------------


def test_default_output_names_beside_inputs(tmp_path, capsys):
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, pp, mp)
    assert code == 0 and err == ""
    after = snapshot(tmp_path)
    new = set(after) - set(before)
    assert new == {"yoloface-50k.bnfix.prototxt", "yoloface-50k.bnfix.caffemodel"}
    assert {k: after[k] for k in before} == before  # inputs untouched
    assert "yoloface-50k.bnfix.caffemodel" in out  # "wrote ..." lines
    text = (tmp_path / "yoloface-50k.bnfix.prototxt").read_text()
    assert text.count("eps: 1e-06") == SAMPLE_BN
    bns = [l for l in cp.parse((tmp_path / "yoloface-50k.bnfix.caffemodel").read_bytes()).layer
           if l.type == "BatchNorm"]
    assert len(bns) == SAMPLE_BN
    src = [l for l in cp.parse(SAMPLE_M.read_bytes()).layer if l.type == "BatchNorm"]
    assert [l.batch_norm_param for l in bns] == [l.batch_norm_param for l in src]  # runtimes read the prototxt


def test_output_dir_is_created_nested_with_input_names(tmp_path, capsys):
    out_dir = tmp_path / "a" / "b" / "c"
    code, _, _ = run(capsys, SAMPLE_P, SAMPLE_M, "-o", out_dir, "-q")
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["yoloface-50k.caffemodel", "yoloface-50k.prototxt"]
    assert (out_dir / "yoloface-50k.caffemodel").read_bytes() != SAMPLE_M.read_bytes()
    assert "# bnfix: eps fit" in (out_dir / "yoloface-50k.prototxt").read_text()


def test_in_place_keeps_orig_and_second_run_is_a_no_op(tmp_path, capsys):
    pp, mp = copy_sample(tmp_path)
    orig = {pp.name: sha(pp), mp.name: sha(mp)}
    code, _, _ = run(capsys, pp, mp, "--in-place", "-q")
    assert code == 0
    assert sha(pp) != orig[pp.name] and sha(mp) != orig[mp.name]
    assert sha(tmp_path / (pp.name + ".orig")) == orig[pp.name]
    assert sha(tmp_path / (mp.name + ".orig")) == orig[mp.name]
    first = snapshot(tmp_path)
    assert not [n for n in first if n.endswith(".bnfix-tmp")]

    code, _, _ = run(capsys, pp, mp, "--in-place", "-q")
    assert code == 0
    assert snapshot(tmp_path) == first  # patched files unchanged, .orig still the true originals


# -- modes: --check, --dry-run ---------------------------------------------------------------


def test_check_finds_work_then_none_and_writes_nothing(tmp_path, capsys):
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, out, _ = run(capsys, pp, mp, "--check")
    assert code == 1
    assert "layer1-bn" in out
    assert snapshot(tmp_path) == before

    assert run(capsys, pp, mp, "-o", tmp_path / "out", "-q")[0] == 0
    out_p, out_m = tmp_path / "out" / pp.name, tmp_path / "out" / mp.name
    before = snapshot(tmp_path)
    code, _, _ = run(capsys, out_p, out_m, "--check")
    assert code == 0
    code, out, err = run(capsys, out_p, out_m, "--check", "-q")
    assert (code, out, err) == (0, "", "")
    assert snapshot(tmp_path) == before


def test_dry_run_prints_table_and_writes_nothing(tmp_path, capsys):
    pp, mp = copy_sample(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, pp, mp, "--dry-run")
    assert code == 0 and err == ""
    names = [l.name for l in cp.parse(SAMPLE_M.read_bytes()).layer if l.type == "BatchNorm"]
    assert len(names) == SAMPLE_BN
    assert all(n in out for n in names)
    assert "23 of 23 BatchNorm layers patched" in out
    assert "wrote" not in out
    assert snapshot(tmp_path) == before


# -- report: --json, --quiet, colour, formula ------------------------------------------------


def test_json_file_schema(tmp_path, capsys):
    report = tmp_path / "r" / "out.json"
    code, out, err = run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path / "o", "--json", report)
    assert code == 0 and err == ""
    assert "layer1-bn" in out  # the table still goes to stdout when JSON goes to a file
    j = strict_json(report.read_text())
    assert set(j) == {"bnfix", "pairs", "errors", "unpaired", "totals"}
    assert j["bnfix"] == bnfix.__version__
    assert j["errors"] == []
    (pair,) = j["pairs"]
    assert {"prototxt", "caffemodel", "source", "target_eps", "layers", "totals", "warnings",
            "outputs"} <= set(pair)
    assert (pair["prototxt"], pair["caffemodel"]) == (str(SAMPLE_P), str(SAMPLE_M))  # as given
    assert pair["source"] == {"preset": "pjreddie-cpu", "formula": "sqrt(var) + 1e-06", "inside": 0.0,
                              "outside": 1e-6}
    assert pair["target_eps"] == 1e-6
    assert pair["warnings"] == []
    assert Path(pair["outputs"]["prototxt"]).resolve() == tmp_path / "o" / SAMPLE_P.name
    assert Path(pair["outputs"]["caffemodel"]).resolve() == tmp_path / "o" / SAMPLE_M.name
    assert len(pair["layers"]) == SAMPLE_BN
    for layer in pair["layers"]:
        assert set(layer) == LAYER_KEYS
        assert layer["status"] == "patched" and layer["warning"] is False and layer["reason"] == ""
        assert isinstance(layer["channels"], int) and layer["channels"] > 0
        assert "variance recomputed" in layer["changes"] and "eps set" in layer["changes"]
        assert layer["eps_before"] == 1e-5 and math.isclose(layer["eps_after"], 1e-6, rel_tol=1e-6)
        assert layer["negative_channels"] == 0
        assert 0 <= layer["worst_channel"] < layer["channels"]
        assert layer["err_after"] <= 1e-7 < layer["err_before"]
    t = pair["totals"]
    assert (t["layers"], t["patched"], t["skipped"], t["up_to_date"]) == (SAMPLE_BN, SAMPLE_BN, 0, 0)
    assert t["channels"] == sum(l["channels"] for l in pair["layers"])
    assert j["totals"]["pairs"] == 1 and j["totals"]["patched"] == SAMPLE_BN


def test_json_to_stdout_is_pure_json_and_table_goes_to_stderr(tmp_path, capsys):
    code, out, err = run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path, "--json", "-")
    assert code == 0
    j = strict_json(out)
    assert j["totals"]["patched"] == SAMPLE_BN
    assert "layer1-bn" in err and "bnfix: error" not in err

    code, out, err = run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path / "q", "--json", "-", "--quiet")
    assert code == 0 and err == ""
    assert strict_json(out)["totals"]["patched"] == SAMPLE_BN


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    code, out, err = run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path, "--quiet")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / SAMPLE_M.name).exists()


def test_no_ansi_when_not_a_tty_or_no_color(tmp_path, capsys, monkeypatch):
    code, out, _ = run(capsys, SAMPLE_P, SAMPLE_M, "--dry-run")
    assert code == 0 and "layer1-bn" in out and ANSI not in out
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, _ = run(capsys, SAMPLE_P, SAMPLE_M, "--dry-run")
    assert code == 0 and "layer1-bn" in out and ANSI not in out
    code, out, _ = run(capsys, SAMPLE_P, SAMPLE_M, "--dry-run", "--color", "never")
    assert code == 0 and ANSI not in out


def test_color_always_emits_ansi(capsys):
    code, out, _ = run(capsys, SAMPLE_P, SAMPLE_M, "--dry-run", "--color", "always")
    assert code == 0 and ANSI in out


def _run_in_pty(*args, env_extra: dict) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "TTY_COMPATIBLE")}
    env.update(TERM="xterm-256color", COLUMNS="200", **env_extra)  # wide enough that names do not wrap
    return run_in_pty(args, env, timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_gets_colour_by_default():
    """The control for the NO_COLOR test below: the pty harness does see colour."""
    rc, out = _run_in_pty(SAMPLE_P, SAMPLE_M, "--dry-run", env_extra={})
    assert rc == 0 and "layer1-bn" in out and ANSI in out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_no_color_env_on_a_terminal_has_no_ansi():
    """Regression: rich's no_color kept bold/dim escapes on a terminal."""
    rc, out = _run_in_pty(SAMPLE_P, SAMPLE_M, "--dry-run", env_extra={"NO_COLOR": "1"})
    assert rc == 0 and "layer1-bn" in out
    assert ANSI not in out


@pytest.mark.parametrize("source,formula", [
    (None, "sqrt(var) + 1e-06"),
    ("opencv", "sqrt(var + 1e-06)"),
    ("sqrt(var+2e-6)+1e-7", "sqrt(var + 2e-06) + 1e-07"),
], ids=["default", "opencv", "hand-written"])
def test_summary_names_the_formula(tmp_path, capsys, source, formula):
    pp, mp = write_pair(tmp_path, TWO_BN_PROTOTXT, two_bn_model([1.0, 2.0]))
    extra = ["--source", source] if source else []
    for mode, expected_code in ((["-o", "out"], 0), (["--dry-run"], 0), (["--check"], 1)):
        code, out, _ = run(capsys, pp, mp, *extra, *mode)
        assert code == expected_code
        assert f"Darknet formula assumed: D = {formula}" in out, mode
    code, j, _ = json_run(capsys, pp, mp, *extra, "--dry-run")
    assert j["pairs"][0]["source"]["formula"] == formula


def test_target_eps_stored_with_force(tmp_path, capsys):
    code, j, _ = json_run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path, "--target-eps", "1e-5", "--force")
    assert code == 0
    assert j["totals"]["patched"] == SAMPLE_BN and j["totals"]["err_after"] <= 1e-6
    text = (tmp_path / SAMPLE_P.name).read_text()
    assert text.count("eps: 1e-05") == SAMPLE_BN
    bns = [l for l in cp.parse((tmp_path / SAMPLE_M.name).read_bytes()).layer if l.type == "BatchNorm"]
    assert all(not l.batch_norm_param.HasField("eps") for l in bns)  # the caffemodel's copy is left alone


def test_target_eps_1e5_patches_unmarked_default_eps(tmp_path, capsys):
    """Regression: with no eps written (Caffe's default 1e-5) every layer used to be skipped as
    'eps is already 1e-05 but there is no bnfix marker'."""
    code, j, _ = json_run(capsys, SAMPLE_P, SAMPLE_M, "-o", tmp_path, "--target-eps", "1e-5")
    assert code == 0
    assert (tmp_path / SAMPLE_P.name).read_text().count("eps: 1e-05") == SAMPLE_BN
    assert j["totals"]["patched"] == SAMPLE_BN
    assert j["totals"]["err_after"] <= 1e-6


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"bnfix {bnfix.__version__}"


def test_help_mentions_every_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for opt in ("-o", "--output-dir", "--in-place", "--check", "--dry-run", "--source", "--target-eps",
                "--force", "--json", "-q", "--quiet", "--color", "--version", "--help",
                "pjreddie-cpu", "pjreddie-gpu", "alexeyab", "opencv"):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out), opt


# -- several pairs ---------------------------------------------------------------------------


def test_several_pairs_one_broken(tmp_path, capsys):
    good = copy_sample(tmp_path / "good")
    broken = copy_sample(tmp_path / "broken")
    broken[1].write_bytes(broken[1].read_bytes()[:-7])
    code, out, err = run(capsys, *broken, *good, "--json", "-", "-q")
    assert code == 2
    one_error(err, broken[1].name)
    j = strict_json(out)
    assert len(j["errors"]) == 1
    e = j["errors"][0]
    assert [Path(e["prototxt"]).resolve(), Path(e["caffemodel"]).resolve()] == list(broken)
    assert broken[1].name in e["error"]
    assert [Path(p["prototxt"]).resolve() for p in j["pairs"]] == [good[0]]
    assert (tmp_path / "good" / "yoloface-50k.bnfix.caffemodel").exists()
    assert (tmp_path / "good" / "yoloface-50k.bnfix.prototxt").exists()
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == ["yoloface-50k.caffemodel",
                                                                       "yoloface-50k.prototxt"]


def test_several_good_pairs(tmp_path, capsys):
    a = copy_sample(tmp_path, "a")
    b = copy_sample(tmp_path, "b")
    code, out, _ = run(capsys, *a, *b)
    assert code == 0
    assert out.splitlines()[0] == "a.prototxt + a.caffemodel: 23 patched of 23 layers; error 2.1e-02 → 8.5e-08 (not exact in nvcaffe, nvcaffe-0.16.1, caffe2onnx, merge_bn)"
    assert out.splitlines()[-1] == ("total: 2 pair(s), 46 layers patched, 0 reverted, 0 up to date, 0 skipped; "
                                    "worst error 2.1e-02 → 8.5e-08; 0 pair(s) failed")
    assert (tmp_path / "a.bnfix.caffemodel").read_bytes() == (tmp_path / "b.bnfix.caffemodel").read_bytes()


# -- idempotency -----------------------------------------------------------------------------


@pytest.mark.parametrize("prototxt,model,n", [(SAMPLE_P, SAMPLE_M, SAMPLE_BN), (NANO_P, NANO_M, NANO_BN)],
                         ids=["yoloface", "nano"])
def test_running_on_own_output_is_byte_identical(tmp_path, capsys, prototxt, model, n):
    code, j, _ = json_run(capsys, prototxt, model, "-o", tmp_path / "once")
    assert code == 0 and j["totals"]["patched"] == n
    once = (tmp_path / "once" / prototxt.name, tmp_path / "once" / model.name)
    code, j, _ = json_run(capsys, *once, "-o", tmp_path / "twice")
    assert code == 0
    assert j["totals"]["up_to_date"] == n and j["totals"]["patched"] == 0
    assert all(l["status"] == "up to date" and not l["warning"] for l in j["pairs"][0]["layers"])
    for f in once:
        assert (tmp_path / "twice" / f.name).read_bytes() == f.read_bytes()


# -- the ambiguous case: eps already 1e-6 but no bnfix marker --------------------------------


def test_eps_already_set_without_marker_is_skipped_unless_forced(tmp_path, capsys):
    pp, mp = copy_sample(tmp_path / "in")
    text = pp.read_text().replace("use_global_stats: true", "use_global_stats: true\n        eps: 1e-06")
    assert text.count("eps: 1e-06") == SAMPLE_BN
    pp.write_text(text)

    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out")
    assert code == 0
    layers = j["pairs"][0]["layers"]
    assert len(layers) == SAMPLE_BN
    assert all(l["status"] == "skipped" and l["warning"] is True and l["reason"] for l in layers)
    assert (tmp_path / "out" / pp.name).read_bytes() == pp.read_bytes()
    assert (tmp_path / "out" / mp.name).read_bytes() == mp.read_bytes()

    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "forced", "--force")
    assert code == 0
    layers = j["pairs"][0]["layers"]
    assert all(l["status"] == "patched" and l["err_after"] <= 1e-7 for l in layers)
    assert (tmp_path / "forced" / pp.name).read_text().count("# bnfix: eps fit") == SAMPLE_BN
    assert (tmp_path / "forced" / mp.name).read_bytes() != mp.read_bytes()


# -- scale factor: Caffe-trained statistics (s != 1) and the converter's s == 0 --------------

S_TRAINED = 999.98
VAR_EFF = np.array([0.5, 1.0, 2.0, 4e-4])


def test_caffe_trained_statistics_skipped_without_force(tmp_path, capsys):
    stored = (VAR_EFF * np.float32(S_TRAINED)).astype(np.float32)
    pp, mp = write_pair(tmp_path, TWO_BN_PROTOTXT, two_bn_model(stored, S_TRAINED))
    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out")
    assert code == 0
    bn2 = {l["name"]: l for l in j["pairs"][0]["layers"]}["bn2"]
    assert bn2["status"] == "skipped" and bn2["warning"] is True and "scale factor" in bn2["reason"]
    out = layers_by_name(tmp_path / "out" / mp.name)
    assert np.array_equal(blob(out["bn2"], 1), stored)  # untouched
    assert not out["bn2"].HasField("batch_norm_param")
    (block,) = block_named((tmp_path / "out" / pp.name).read_text(), "bn2")
    assert "eps" not in block and "bnfix" not in block

    code, _, _ = run(capsys, pp, mp, "--check")
    assert code == 1  # bn1 still needs work; bn2 alone would not count


def test_caffe_trained_statistics_forced(tmp_path, capsys):
    stored = (VAR_EFF * np.float32(S_TRAINED)).astype(np.float32)
    pp, mp = write_pair(tmp_path, TWO_BN_PROTOTXT, two_bn_model(stored, S_TRAINED))
    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out", "--force")
    assert code == 0
    bn2 = {l["name"]: l for l in j["pairs"][0]["layers"]}["bn2"]
    assert bn2["status"] == "patched" and bn2["err_after"] <= 1e-6

    out = layers_by_name(tmp_path / "out" / mp.name)["bn2"]
    s = float(blob(out, 2)[0])
    assert s == float(np.float32(S_TRAINED))  # the scale factor is kept
    eps = float(np.float32(1e-6))
    var = stored.astype(np.float64) / s
    expected = s * (darknet_cpu(var) ** 2 - eps)
    np.testing.assert_allclose(blob(out, 1), expected, rtol=5e-7)
    caffe = np.sqrt(blob(out, 1).astype(np.float64) / s + eps)
    assert np.max(np.abs(caffe - darknet_cpu(var)) / darknet_cpu(var)) <= 1e-6


def test_zero_scale_factor_is_fixed(tmp_path, capsys):
    var = np.array([0.25, 1.0, 3.0, 1e-5], np.float32)
    pp, mp = write_pair(tmp_path, TWO_BN_PROTOTXT, two_bn_model(var, 0.0))
    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out")
    assert code == 0
    bn2 = {l["name"]: l for l in j["pairs"][0]["layers"]}["bn2"]
    assert bn2["status"] == "patched"
    assert any("scale factor" in c for c in bn2["changes"])
    assert bn2["err_after"] <= 1e-6 < bn2["err_before"]
    out = layers_by_name(tmp_path / "out" / mp.name)["bn2"]
    assert float(blob(out, 2)[0]) == 1.0
    eps = float(np.float32(1e-6))
    np.testing.assert_allclose(blob(out, 1), darknet_cpu(var) ** 2 - eps, rtol=5e-7)


# -- use_global_stats and phase-split duplicates ---------------------------------------------

PHASE_PROTOTXT = cp.bn_prototxt(["bn1"], param="batch_norm_param {\n    use_global_stats: false\n  }") + """\
layer {
  name: "bn2"
  type: "BatchNorm"
  bottom: "conv"
  top: "conv"
  include { phase: TRAIN }
  batch_norm_param {
    use_global_stats: false
  }
}
layer {
  name: "bn2"
  type: "BatchNorm"
  bottom: "conv"
  top: "conv"
  include { phase: TEST }
  batch_norm_param {
    use_global_stats: false
  }
}
"""


def test_use_global_stats_and_phase_split_duplicates(tmp_path, capsys):
    model = cp.model_bytes(cp.conv_layer("conv", np.ones(4)),
                           cp.bn_layer("bn1", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
                           cp.bn_layer("bn2", np.zeros(4), [1.0, 2.0, 3.0, 4.0]))
    pp, mp = write_pair(tmp_path, PHASE_PROTOTXT, model)
    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out")
    assert code == 0
    layers = {l["name"]: l for l in j["pairs"][0]["layers"]}
    assert list(layers) == ["bn1", "bn2"]  # one report per name, one caffemodel entry for bn2
    assert "use_global_stats fixed" in layers["bn1"]["changes"]
    assert "use_global_stats fixed" in layers["bn2"]["changes"]  # from the TEST copy
    assert all(l["status"] == "patched" and l["err_after"] <= 1e-7 for l in layers.values())

    text = (tmp_path / "out" / pp.name).read_text()
    (bn1,) = block_named(text, "bn1")
    train, test = block_named(text, "bn2")
    assert "phase: TRAIN" in train and "phase: TEST" in test
    assert "use_global_stats: true" in bn1
    assert "use_global_stats: false" in train  # training copy keeps batch statistics
    assert "use_global_stats: true" in test
    for block in (bn1, train, test):
        assert re.findall(r"\beps: (\S+)", block) == ["1e-06"]

    out = layers_by_name(tmp_path / "out" / mp.name)
    assert [l.name for l in cp.parse((tmp_path / "out" / mp.name).read_bytes()).layer] == ["conv", "bn1", "bn2"]
    assert out["bn2"].batch_norm_param == layers_by_name(mp)["bn2"].batch_norm_param  # left alone


# -- corrupt or odd statistics outside the patch path ---------------------------------------


@pytest.mark.parametrize("s", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_corrupt_scale_factor_is_an_error(tmp_path, capsys, s):
    pp, mp = write_pair(tmp_path, TWO_BN_PROTOTXT, two_bn_model([1.0, 2.0, 3.0, 4.0], s))
    before = snapshot(tmp_path)
    code, _, err = run(capsys, pp, mp)
    assert code == 2
    one_error(err, mp.name, "'bn2'", "scale factor")
    assert snapshot(tmp_path) == before


def _skipped_negative_variance(d: Path):
    """A Caffe-trained layer (skipped without --force) with one negative variance channel."""
    return write_pair(d, TWO_BN_PROTOTXT, two_bn_model([1.0, 2.0, -3.0, 4.0], S_TRAINED))


def _odd_eps(value: str):
    def make(d: Path):
        text = cp.bn_prototxt(["bn1", "bn2"], param=f"batch_norm_param {{\n    eps: {value}\n  }}")
        return write_pair(d, text, two_bn_model([1.0, 2.0, 3.0, 4.0]))

    return make


@pytest.mark.parametrize("make", [_skipped_negative_variance, _odd_eps("-10"), _odd_eps("nan"), _odd_eps("1e400")],
                         ids=["skipped-layer-negative-variance", "eps-negative", "eps-nan", "eps-overflows"])
def test_odd_statistics_give_clean_output(tmp_path, capsys, make):
    """Either a clean run (exit 0, nothing on stderr) or one error line: never numpy warnings, and
    the --json report stays standard JSON."""
    pp, mp = make(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, pp, mp, "--dry-run", "--json", "-", "-q")
    assert [str(w.message) for w in caught] == []
    assert code in (0, 2)
    if code == 0:
        assert err == ""
    else:
        one_error(err, mp.name if make is _skipped_negative_variance else pp.name)
    strict_json(out)


# -- the README example ----------------------------------------------------------------------


def test_readme_example(tmp_path):
    out_dir = tmp_path / "OUT"
    report = tmp_path / "report.json"
    proc = run_proc(SAMPLE_P.relative_to(REPO), SAMPLE_M.relative_to(REPO), "-o", out_dir, "--json", report,
                    cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "23 of 23 BatchNorm layers patched" in proc.stdout
    j = strict_json(report.read_text())
    layers = j["pairs"][0]["layers"]
    err_before = max(l["err_before"] for l in layers)
    err_after = max(l["err_after"] for l in layers)
    assert 2.0e-2 <= err_before <= 2.2e-2
    assert err_after <= 1e-7
    assert j["totals"]["err_before"] == err_before and j["totals"]["err_after"] == err_after
    assert sorted(p.name for p in out_dir.iterdir()) == ["yoloface-50k.caffemodel", "yoloface-50k.prototxt"]


# -- progress bar ------------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal_after_a_second(tmp_path, monkeypatch):
    """A bar appears on a terminal once the copy has run for more than a second; never on a pipe
    or with --quiet (no console at all)."""
    import io
    import time

    from rich.console import Console

    from bnfix import output

    model = tmp_path / "m.caffemodel"
    model.write_bytes(b"\0" * 1000)
    assert output.BytesProgress.on(None, model) is None
    assert output.BytesProgress.on(Console(file=io.StringIO(), force_terminal=False), model) is None
    out = io.StringIO()
    clock = iter([0.0, 0.5, 2.0, 3.0, 4.0] + [5.0] * 50)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    update = output.BytesProgress.on(Console(file=out, force_terminal=True, width=80), model)
    assert update is not None
    update(100)  # 0.5 s: too early for a bar
    assert out.getvalue() == ""
    update(500)  # 2 s: the bar starts (a copy that fails here still gets it removed by close)
    bar = update.bar
    assert bar is not None and bar.live.is_started
    update.close()  # transient: it erases itself, and its refresh thread ends
    assert update.bar is None and not bar.live.is_started
    assert "writing" in out.getvalue()


# -- line endings and escaped names, end to end (issue 8, point 5) ---------------------------


@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["crlf", "cr-only"])
def test_other_line_endings_patch_and_revert_exactly_like_lf(tmp_path, capsys, ending):
    """Markers land on each layer's own opening line (on a CR-only line with their own LF, or
    Caffe's parser would read the rest of the file as a comment); a second run is up to date;
    the revert gives the file back byte for byte."""
    lf = SAMPLE_P.read_bytes()
    text = lf.replace(b"\n", ending.encode())
    (tmp_path / "m.prototxt").write_bytes(text)
    shutil.copy(SAMPLE_M, tmp_path / "m.caffemodel")
    assert main([str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), "-o", str(tmp_path / "p"), "-q"]) == 0
    assert main([str(SAMPLE_P), str(SAMPLE_M), "-o", str(tmp_path / "lf"), "-q"]) == 0
    patched = (tmp_path / "p" / "m.prototxt").read_bytes()
    normalised = patched.replace(b"\n\r", b"\r").replace(ending.encode(), b"\n") if ending == "\r" else \
        patched.replace(b"\r\n", b"\n")
    assert normalised == (tmp_path / "lf" / SAMPLE_P.name).read_bytes()
    assert (tmp_path / "p" / "m.caffemodel").read_bytes() == (tmp_path / "lf" / SAMPLE_M.name).read_bytes()
    assert main([str(tmp_path / "p" / "m.prototxt"), str(tmp_path / "p" / "m.caffemodel"), "--check"]) == 0
    assert main([str(tmp_path / "p" / "m.prototxt"), str(tmp_path / "p" / "m.caffemodel"), "--revert",
                 "-o", str(tmp_path / "r"), "-q"]) == 0
    assert (tmp_path / "r" / "m.prototxt").read_bytes() == text
    assert (tmp_path / "r" / "m.caffemodel").read_bytes() == SAMPLE_M.read_bytes()
    capsys.readouterr()


@pytest.mark.parametrize("spelled,name", [
    (r'"bn\"1"', 'bn"1'), (r"'bn\'2'", "bn'2"), (r'"\142n3"', "bn3"), (r'"\x62n4"', "bn4"),
    (r'"b" "n5"', "bn5"), (r'"\303\251"', "é"),
], ids=["escaped-quote", "single-quoted", "octal", "hex", "concatenated", "utf-8-octal"])
def test_escaped_names_match_the_caffemodel_as_caffe_reads_them(tmp_path, capsys, spelled, name):
    text = f'layer {{\n  name: {spelled}\n  type: "BatchNorm"\n  bottom: "x"\n  top: "x"\n}}\n'
    model = cp.model_bytes(cp.bn_layer(name, [0.0, 0.1], [1e-3, 0.5]))
    pp, mp = write_pair(tmp_path, text, model)
    code, j, _ = json_run(capsys, pp, mp, "-o", tmp_path / "out")
    assert code == 0
    (layer,) = j["pairs"][0]["layers"]
    assert layer["name"] == name and layer["status"] == "patched"
    patched = cp.parse((tmp_path / "out" / mp.name).read_bytes()).layer[0]
    assert patched.name == name and list(patched.blobs[1].data) != [np.float32(1e-3), np.float32(0.5)]
