"""The lossless prototxt editor: identity round trips, exact edits, and errors that point at text."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from conftest import DATA, NANO, SAMPLE, shared_corpus

import bnfix
from bnfix import prototxt
from bnfix.errors import BnfixError

SHIPPED = sorted((DATA / "prototxt").glob("*.prototxt")) + [SAMPLE / "yoloface-50k.prototxt",
                                                             NANO / "MobileNetV2-YOLOv3-Nano-voc.prototxt"]
MARK = "  # bnfix: eps fit to sqrt(var) + 1e-06, eps 1e-06, stats * from * [undo {}]"
_DIGESTS = re.compile(r"stats [0-9a-f]{12} from [0-9a-f]{12}")


def undigested(text: str) -> str:
    """The text with the markers' digests (which depend on the statistics) replaced by '*'."""
    return _DIGESTS.sub("stats * from *", text)


def corpus_files() -> list[Path]:
    return sorted(shared_corpus("prototxt").glob("*.prototxt"))


# -- identity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_render_back_identically(path):
    doc = prototxt.read(path)
    assert doc.render([]) == path.read_bytes().decode()


def test_whole_corpus_renders_back_identically():
    files = corpus_files()
    assert len(files) == 15
    for path in files:
        assert prototxt.read(path).render([]) == path.read_bytes().decode()


# -- patching every real prototxt ----------------------------------------------------------------

def _bn_line_spans(doc: prototxt.Document) -> list[tuple[int, int]]:
    """0-based [first, last] line numbers of every BatchNorm layer."""
    lines = lambda off: doc.text.count("\n", 0, off)  # noqa: E731
    return [(lines(l.field.start), lines(l.field.end)) for l in doc.layers() if l.type == "BatchNorm"]


def check_lossless(old: str, new: str) -> None:
    """Only lines inside BatchNorm layers changed, line endings kept, non-BN layers identical."""
    doc = prototxt.parse(old)
    spans = _bn_line_spans(doc)
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    for tag, i1, i2, _j1, _j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        first, last = (i1, i2 - 1) if i2 > i1 else (i1 - 1, i1)  # an insertion sits between lines
        assert any(s <= first and last <= e for s, e in spans), f"edit outside BatchNorm at line {i1 + 1}"
    if "\r\n" in old:
        assert new.count("\n") == new.count("\r\n"), "CRLF file got a bare LF"
    new_doc = prototxt.parse(new)
    olds = [l for l in doc.layers() if l.type != "BatchNorm"]
    news = [l for l in new_doc.layers() if l.type != "BatchNorm"]
    assert [old[l.field.start:l.field.end] for l in olds] == [new[l.field.start:l.field.end] for l in news]
    for layer in new_doc.layers():
        if layer.type == "BatchNorm":
            assert layer.eps == 1e-6
            assert "# bnfix:" in new[new_doc.line_start(layer.field.start):new_doc.line_end(layer.field.start)]


def _patch_all(path: Path, pair) -> None:
    text = path.read_bytes().decode()
    pp, mp = pair(text, name=path.stem)
    result = bnfix.patch(pp, mp, force=True)  # force: landmark106 etc. are patched regardless
    bn_names = {l.name for l in prototxt.parse(text).layers() if l.type == "BatchNorm"}
    assert {r.name for r in result.layers} == bn_names
    assert all(r.status == "patched" for r in result.layers)
    check_lossless(text, result.new_prototxt)
    # A second run over the output changes nothing.
    out_p, out_m = pp.with_name("out.prototxt"), mp.with_name("out.caffemodel")
    result.save(out_p, out_m)
    again = bnfix.patch(out_p, out_m)
    assert not again.changed and all(r.status == "up to date" for r in again.layers)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_patch_losslessly(path, pair):
    _patch_all(path, pair)


def test_whole_corpus_patches_losslessly(pair):
    for path in corpus_files():
        _patch_all(path, pair)


# -- exact edits on small files ------------------------------------------------------------------

def _patched(pair, text: str, **kw) -> str:
    pp, mp = pair(text)
    return undigested(bnfix.patch(pp, mp, **kw).new_prototxt)


def _patched_twice(pair, text: str) -> tuple[str, str]:
    """The patched text, and the status of its layer when the saved pair is read again."""
    pp, mp = pair(text)
    result = bnfix.patch(pp, mp)
    result.save(pp.with_name("again.prototxt"), mp.with_name("again.caffemodel"))
    again = bnfix.patch(pp.with_name("again.prototxt"), mp.with_name("again.caffemodel"))
    return undigested(result.new_prototxt), again.layers[0].status


BN = 'layer {{\n  name: "bn"\n  type: "BatchNorm"\n  bottom: "x"\n  top: "x"\n{body}}}\n'


def test_adds_eps_to_multiline_block(pair):
    text = BN.format(body="  batch_norm_param {\n    use_global_stats: true\n  }\n")
    assert _patched(pair, text) == (
        "layer {" + MARK.format("eps=none") + '\n  name: "bn"\n  type: "BatchNorm"\n'
        '  bottom: "x"\n  top: "x"\n  batch_norm_param {\n    use_global_stats: true\n    eps: 1e-06\n  }\n}\n')


def test_adds_eps_to_one_line_block(pair):
    text = BN.format(body="  batch_norm_param { use_global_stats: true }\n")
    assert "  batch_norm_param { use_global_stats: true eps: 1e-06 }\n" in _patched(pair, text)


def test_colon_before_brace(pair):
    text = BN.format(body="  batch_norm_param: {\n    use_global_stats: true\n  }\n")
    assert "batch_norm_param: {\n    use_global_stats: true\n    eps: 1e-06\n  }" in _patched(pair, text)


def test_replaces_existing_eps_keeping_its_comment(pair):
    text = BN.format(body="  batch_norm_param {\n    eps: 0.0001  # from the converter\n  }\n")
    new = _patched(pair, text)
    assert "    eps: 1e-06  # from the converter\n" in new
    assert MARK.format("eps=0.0001") in new


def test_odd_eps_spelling_is_replaced_and_remembered(pair):
    text = BN.format(body="  batch_norm_param { use_global_stats: true moving_average_fraction: 0.9 eps: 10e-06 }\n")
    new = _patched(pair, text)
    assert "moving_average_fraction: 0.9 eps: 1e-06 }" in new
    assert "[undo eps=10e-06]" in new


def test_adds_block_when_missing(pair):
    text = BN.format(body="")
    new = _patched(pair, text)
    assert new.endswith('  top: "x"\n  batch_norm_param {\n    eps: 1e-06\n  }\n}\n')
    assert "[undo eps=block]" in new


def test_adds_block_with_four_space_and_tab_indent(pair):
    text = 'layer {\n    name: "bn"\n    type: "BatchNorm"\n}\n'
    assert '    type: "BatchNorm"\n    batch_norm_param {\n        eps: 1e-06\n    }\n}' in _patched(pair, text)
    text = 'layer {\n\tname: "bn"\n\ttype: "BatchNorm"\n}\n'
    assert '\ttype: "BatchNorm"\n\tbatch_norm_param {\n\t\teps: 1e-06\n\t}\n}' in _patched(pair, text)


def test_empty_blocks(pair):
    # `{}` gets exactly " eps: 1e-06" inserted, the text a revert removes again.
    assert "batch_norm_param { eps: 1e-06}" in _patched(pair, BN.format(body="  batch_norm_param {}\n"))
    new = _patched(pair, BN.format(body="  batch_norm_param {\n  }\n"))
    assert "  batch_norm_param {\n    eps: 1e-06\n  }\n" in new


def test_one_line_layer(pair):
    text = 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }\n'
    new = _patched(pair, text)
    assert new.startswith('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" batch_norm_param { eps: 1e-06 } }  # bnfix:')


def test_crlf_is_kept(pair):
    text = BN.format(body="  batch_norm_param {\n    use_global_stats: true\n  }\n").replace("\n", "\r\n")
    new = _patched(pair, text)
    assert "    use_global_stats: true\r\n    eps: 1e-06\r\n  }" in new
    assert new.count("\n") == new.count("\r\n")


def test_brace_on_its_own_line(pair):
    text = 'layer\n{\n  name: "bn"\n  type: "BatchNorm"\n}\n'
    new = _patched(pair, text)
    assert new.startswith("layer" + MARK.format("eps=block") + "\n{\n")
    check_lossless(text, new)


def test_fields_on_the_opening_line(pair):
    """The new block goes where the marker goes (end of the opening line): marker first."""
    text = 'layer { name: "bn" type: "BatchNorm"\n}\n'
    new, status = _patched_twice(pair, text)
    assert new == ('layer { name: "bn" type: "BatchNorm"' + MARK.format("eps=block")
                   + "\n  batch_norm_param {\n    eps: 1e-06\n  }\n}\n")
    assert status == "up to date"


def test_use_global_stats_false_fixed_only_at_test_time(pair):
    text = (
        'layer {\n  name: "bn"\n  type: "BatchNorm"\n  include { phase: TRAIN }\n'
        '  batch_norm_param {\n    use_global_stats: false\n  }\n}\n'
        'layer {\n  name: "bn"\n  type: "BatchNorm"\n  include { phase: TEST }\n'
        '  batch_norm_param {\n    use_global_stats: false\n  }\n}\n'
    )
    pp, mp = pair(text)
    result = bnfix.patch(pp, mp)
    train, test = undigested(result.new_prototxt).split("layer {")[1:]
    assert "use_global_stats: false\n    eps: 1e-06" in train
    assert "use_global_stats: true\n    eps: 1e-06" in test
    assert "[undo eps=none ugs=false]" in test
    assert "use_global_stats fixed" in result.layers[0].changes


def test_deploy_layer_without_include_runs_at_test(pair):
    text = BN.format(body="  batch_norm_param { use_global_stats: false }\n")
    assert "use_global_stats: true eps: 1e-06" in _patched(pair, text)


def test_marker_on_a_line_with_a_comment(pair):
    text = 'layer {  # the first BN\n  name: "bn"\n  type: "BatchNorm"\n}\n'
    new, status = _patched_twice(pair, text)
    assert new.startswith("layer {  # the first BN" + MARK.format("eps=block") + "\n")
    assert status == "up to date"


# -- errors point at text ----------------------------------------------------------------------

INVALID = {
    "unclosed_brace.prototxt": ":1:7: '{' is never closed",
    "stray_brace.prototxt": ":5:1: unexpected '}'",
    "eps_not_a_number.prototxt": ":4:27: layer 'bn': eps 'abc' is not a number",
    "eps_quoted.prototxt": "eps '\"1e-6\"' is not a number",
    "unterminated_string.prototxt": ":2:9: unterminated string",
    "eps_twice.prototxt": ":4:32: layer 'bn': eps given twice",
    "field_without_value.prototxt": ":5:1: expected ':' or '{' after 'top'",
    "ugs_not_boolean.prototxt": "use_global_stats 'maybe' is not a boolean",
    "batchnorm_without_name.prototxt": ":1:1: BatchNorm layer without a name",
}


def test_every_invalid_file_has_an_expected_error():
    assert sorted(INVALID) == sorted(p.name for p in (DATA / "invalid").glob("*.prototxt"))


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_files_raise_with_position(name, pair, tmp_path):
    path = DATA / "invalid" / name
    pp, mp = pair(BN.format(body=""))  # a valid model; the prototxt under test replaces it
    with pytest.raises(BnfixError) as info:
        bnfix.patch(path, mp)
    message = str(info.value)
    assert message.startswith(str(path))
    assert INVALID[name] in message
    assert "\n" not in message


def test_binary_input_is_refused(tmp_path):
    p = tmp_path / "x.prototxt"
    p.write_bytes(b"\x0a\x04test\x00\x01")
    with pytest.raises(BnfixError, match="not a text prototxt"):
        prototxt.read(p)
