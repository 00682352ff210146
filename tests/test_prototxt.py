"""The lossless prototxt editor: identity round trips, exact edits, and errors that point at text."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import caffe_proto as cp
import pytest
from conftest import DATA, NANO, SAMPLE, shared_corpus

import bnfix
from bnfix import prototxt
from bnfix.errors import BnfixError, InputError, ParseError

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
    def lines(off):
        return doc.text.count("\n", 0, off)
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

INVALID = {  # each broken file and its exact message, after the file's path
    "unclosed_brace.prototxt": ":1:7: '{' is never closed",
    "stray_brace.prototxt": ":5:1: unexpected '}' (no block to close)",
    "eps_not_a_number.prototxt": ":4:27: layer 'bn': eps 'abc' is not a number",
    "eps_quoted.prototxt": ":4:27: layer 'bn': eps '\"1e-6\"' is not a number",
    "eps_octal.prototxt": ":4:27: layer 'bn': eps '017' is not a number",  # protobuf refuses octal floats
    "unterminated_string.prototxt": ":2:9: unterminated string",
    "eps_twice.prototxt": ":4:32: layer 'bn': eps given twice",
    "field_without_value.prototxt": ":5:1: expected ':' or '{' after 'top', found '}'",
    "ugs_not_boolean.prototxt": ":4:40: layer 'bn': use_global_stats 'maybe' is not a boolean",
    "ugs_upper_case.prototxt": ":4:40: layer 'bn': use_global_stats 'TRUE' is not a boolean",
    "batchnorm_without_name.prototxt": ":1:1: BatchNorm layer without a name: it cannot be matched to the caffemodel",
    "escape_unknown.prototxt": ':2:12: unknown escape "\\q" in a string',
    "escape_upper_x.prototxt": ':2:12: escape "\\X" is read differently by protobuf versions (write "\\x")',
    "escape_x_without_digit.prototxt": ':2:12: escape "\\x" without a hex digit',
    "escape_u_short.prototxt": ':2:12: escape "\\u" needs 4 hex digits',
    "escape_above_10ffff.prototxt": ':2:12: escape "\\U" needs 8 hex digits, at most 0010FFFF',
    "deep_unclosed.prototxt": ":401:3: '{' is never closed",  # 400 blocks deep: no RecursionError
    "cr_stray_brace.prototxt": ":5:1: unexpected '}' (no block to close)",  # lines end with a lone CR
    # CR-only: Caffe's tokenizer ends a comment only at LF, so this one hides the rest of the file.
    "cr_comment_hides_rest.prototxt": ":1:7: '{' is never closed",
}


def test_every_invalid_file_has_an_expected_error():
    assert sorted(INVALID) == sorted(p.name for p in (DATA / "invalid").glob("*.prototxt"))


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_files_raise_with_position(name, pair, tmp_path):
    path = DATA / "invalid" / name
    _, mp = pair(BN.format(body=""))  # a valid model; the prototxt under test replaces it
    with pytest.raises(ParseError) as info:
        bnfix.patch(path, mp)
    assert str(info.value) == f"{path}{INVALID[name]}"


def test_binary_input_is_refused(tmp_path):
    p = tmp_path / "x.prototxt"
    p.write_bytes(b"\x0a\x04test\x00\x01")
    with pytest.raises(BnfixError, match="not a text prototxt"):
        prototxt.read(p)


# -- the parser: iterative, and the fast path agrees with the token path -------------------------

def _tree(msg: prototxt.Message) -> list:
    return [(f.name, f.start, f.end, f.vstart, [tuple(t) for t in f.value_tokens],
             (f.value.open, f.value.close, _tree(f.value)) if f.value else None) for f in msg.fields]


def _variants(text: str) -> dict[str, str]:
    lf = text.replace("\r\n", "\n")
    return {"lf": lf, "crlf": lf.replace("\n", "\r\n"), "cr": lf.replace("\n", "\r")}


def _check_fast_path(paths: list[Path]) -> None:
    """The one-match-per-field loop is only a shortcut: the token-at-a-time path, which
    accepts the whole grammar alone, must give the same fields, spans and comments."""
    for path in paths:
        for kind, text in _variants(path.read_bytes().decode()).items():
            try:
                fast = prototxt.Document(text, _fast=False)
            except ParseError as exc:  # CR-only files with comments: both must fail alike
                with pytest.raises(ParseError, match=re.escape(str(exc))):
                    prototxt.Document(text)
                continue
            doc = prototxt.Document(text)
            assert _tree(doc.root) == _tree(fast.root), (path.name, kind)
            assert doc.comments_between(0, len(text)) == fast.comments_between(0, len(text))


def test_fast_path_builds_the_same_tree_as_the_token_path():
    _check_fast_path(SHIPPED)


def test_fast_path_agrees_on_the_whole_corpus():
    _check_fast_path(corpus_files())


@pytest.mark.parametrize("depth", [400, 100_000])
def test_deep_nesting_parses_without_recursion(depth):
    doc = prototxt.parse("a {" * depth + " b: 1 " + "}" * depth + "\n")
    msg, seen = doc.root, 0
    while msg.fields and msg.fields[0].value is not None:
        msg, seen = msg.fields[0].value, seen + 1
    assert seen == depth and doc.scalar(msg.fields[0]) == "1"
    lists = prototxt.parse("a: [" + "{ a: [" * depth + "]}" * depth + "]")
    assert lists.root.fields[0].end == len(lists.text)


@pytest.mark.parametrize("depth", [400, 100_000])
def test_deep_unclosed_block_names_the_innermost_brace(depth):
    text = "layer {\n" + "a {\n" * depth
    with pytest.raises(ParseError) as info:
        prototxt.parse(text, "deep.prototxt")
    assert str(info.value) == f"deep.prototxt:{depth + 1}:3: '{{' is never closed"
    with pytest.raises(ParseError) as info:
        prototxt.parse("a {" * depth + "}" * (depth - 1), "deep.prototxt")
    assert str(info.value) == "deep.prototxt:1:3: '{' is never closed"


def test_syntax_errors_are_parse_errors_with_one_line():
    for text, message in [
        ("a: 1,, b: 2", "<prototxt>:1:6: expected a field name, found ','"),
        ("a { b: [1, 2 }", "<prototxt>:1:14: expected a value, found '}'"),
        ("a { b: [1, 2", "<prototxt>:1:8: '[' is never closed"),
        ("a: @", "<prototxt>:1:4: unexpected character '@'"),
        ("a: }", "<prototxt>:1:4: expected a value, found '}'"),
        ("a { b: 1 >", "<prototxt>:1:10: unexpected '>' (no block to close)"),
        ('a: "x\\\ny"', "<prototxt>:1:4: unterminated string"),
        ('a: "x\x00"', "<prototxt>:1:6: NUL character in a string"),
        (r'a: "\u1234\q"', '<prototxt>:1:11: unknown escape "\\q" in a string'),  # after a valid \u
        (r'a: "\U0001F600\x"', '<prototxt>:1:15: escape "\\x" without a hex digit'),
    ]:
        with pytest.raises(ParseError) as info:
            prototxt.parse(text)
        assert str(info.value) == message


# -- line endings: LF, CRLF and CR-only ------------------------------------------------------------

def test_newline_detection():
    assert [prototxt.parse(f"a: 1{nl}b: 2{nl}").newline for nl in ("\n", "\r\n", "\r")] == ["\n", "\r\n", "\r"]
    assert prototxt.parse("a: 1").newline == "\n"
    assert [prototxt.parse(f"a: 1{nl}").comment_needs_lf for nl in ("\n", "\r\n", "\r")] == [False, False, True]


def _comment_free(paths: list[Path]) -> list[Path]:
    return [p for p in paths if "#" not in p.read_bytes().decode()]


def _edit_all(doc: prototxt.Document) -> list[prototxt.Splice]:
    """What a patch does to each BatchNorm layer: replace eps, add it, or add the block."""
    splices = []
    for layer in doc.layers():
        if layer.type != "BatchNorm":
            continue
        eps = layer.bn_field("eps")
        if eps is not None:
            splices.append(layer.set_value(eps, "1e-06"))
        elif layer.bn_param is not None:
            splices.append(layer.add_field(layer.bn_param.value, "eps: 1e-06"))
        else:
            splices.append(layer.add_field(layer.body, f"batch_norm_param {{\n{layer.block_indent()}eps: 1e-06\n}}"))
    return splices


def _check_line_endings(paths: list[Path]) -> None:
    for path in _comment_free(paths):
        docs = {k: prototxt.parse(t) for k, t in _variants(path.read_bytes().decode()).items()}
        facts = {k: [(lay.name, lay.type, lay.bottoms, lay.tops, d.where(lay.field.start), d.where(lay.field.end - 1),
                      d.indent_of(lay.field.start), lay.block_indent()) for lay in d.layers()] for k, d in docs.items()}
        assert facts["lf"] == facts["crlf"] == facts["cr"], path.name
        for kind, d in docs.items():
            assert d.render([]) == d.text
            assert d.newline == {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[kind]
        lf = docs["lf"].render(_edit_all(docs["lf"]))
        assert docs["crlf"].render(_edit_all(docs["crlf"])) == lf.replace("\n", "\r\n"), path.name
        assert docs["cr"].render(_edit_all(docs["cr"])) == lf.replace("\n", "\r"), path.name


def test_cr_and_crlf_files_read_and_edit_like_lf():
    assert len(_comment_free(SHIPPED)) == 7
    _check_line_endings(SHIPPED)


def test_cr_and_crlf_corpus_files_read_and_edit_like_lf():
    assert len(_comment_free(corpus_files())) == 10
    _check_line_endings(corpus_files())


def test_cr_only_edits_land_where_lf_edits_do():
    for body in ("  batch_norm_param {\n    use_global_stats: true\n  }\n",
                 "  batch_norm_param {\n    eps: 0.0001\n  }\n", "", "  batch_norm_param { use_global_stats: true }\n"):
        lf = BN.format(body=body)
        cr = prototxt.parse(lf.replace("\n", "\r"))
        new = cr.render(_edit_all(cr))
        assert "\n" not in new
        assert new.replace("\r", "\n") == prototxt.parse(lf).render(_edit_all(prototxt.parse(lf)))
        assert prototxt.parse(new).layers()[0].eps == 1e-6


def test_a_comment_in_a_cr_only_file_runs_to_the_end():
    """What Caffe sees: protobuf ends a ``#`` comment only at LF."""
    text = 'layer {\r  name: "a"\r  type: "ReLU"\r}\r# two layers follow\rlayer {\r  name: "b"\r  type: "ReLU"\r}\r'
    doc = prototxt.parse(text)
    assert [lay.name for lay in doc.layers()] == ["a"]
    assert [c.text for c in doc.comments_between(0, len(text))] == [text[text.index("#"):]]
    assert prototxt.parse(text.replace("\r", "\n")).layers()[1].name == "b"
    # An LF ends it even in a CR file, and a CR right before that LF is not part of it.
    mixed = prototxt.parse('a: 1  # note\r\nb: 2\r')
    assert [c.text for c in mixed.comments_between(0, 99)] == ["# note"] and mixed.root.fields[1].name == "b"


def test_line_breaks_inside_strings_and_comments_are_not_edit_points():
    """A lone CR inside a comment or string does not end the line for edits: text inserted
    there would be hidden in the comment (or change the string) for Caffe."""
    text = 'layer {\n  name: "bn"\n  type: "BatchNorm"\n  batch_norm_param {\n    use_global_stats: true  # a\rb\n  }\n}\n'
    doc = prototxt.parse(text)
    layer = doc.layers()[0]
    new = doc.render([layer.add_field(layer.bn_param.value, "eps: 1e-06")])
    assert "use_global_stats: true  # a\rb\n    eps: 1e-06\n  }" in new
    assert prototxt.parse(new).layers()[0].eps == 1e-6
    # In a CR-only file, new lines after a comment that an LF ends start with CRLF.
    cr = prototxt.parse(text.replace("\n", "\r").replace("b\r  }", "b\n  }"))
    layer = cr.layers()[0]
    new = cr.render([layer.add_field(layer.bn_param.value, "eps: 1e-06")])
    assert "# a\rb\r\n    eps: 1e-06\n  }" in new
    assert prototxt.parse(new).layers()[0].eps == 1e-6
    s = prototxt.parse('layer { name: "a\rb" type: "ReLU" }\r')
    assert s.line_end(s.root.fields[0].start) == len(s.text) - 1 and s.layers()[0].name == "a\rb"


def test_line_arithmetic_on_cr_crlf_and_lf():
    for nl in ("\n", "\r\n", "\r"):
        doc = prototxt.parse(f"a: 1{nl}  b: 2{nl}{nl}c {{{nl}}}", "x.prototxt")
        b, c = doc.root.fields[1], doc.root.fields[2]
        assert doc.where(b.start) == "x.prototxt:2:3" and doc.where(c.value.close) == "x.prototxt:5:1"
        assert doc.indent_of(b.start) == "  " and doc.text[doc.line_start(b.start):doc.line_end(b.start)] == "  b: 2"
        assert doc.line_break_at(b.start) == nl and doc.line_break_at(c.value.close) == ""
        assert doc.same_line(b.start, b.end) and not doc.same_line(b.start, c.start)


# -- strings and escapes ---------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    return [prototxt.parse(f"layer {{ name: {v} }}").layers()[0].name for v in text.split("|")]


def test_escapes_are_read_as_protobuf_reads_them():
    assert _names(r'"bn\"1"|' r"'a\'b'|" r'"\142n1"|"\x62n1"|"\0"|"\12"|"\x7"|"\x626"|"\6222"') == [
        'bn"1', "a'b", "bn1", "bn1", "\0", "\n", "\x07", "b6", "\udc922"]  # \622 keeps its low byte, 0x92
    assert _names(r'"\a\b\f\n\r\t\v\\\'\"\?"') == ["\a\b\f\n\r\t\v\\'\"?"]
    assert _names(r'"\u00e9"|"\U0001F600"|"\ud83d\ude00"|"é"') == ["é", "\U0001F600", "\U0001F600", "é"]
    # Bytes that are not UTF-8 (an octal/hex byte, a lone surrogate as protobuf encodes it)
    # decode with surrogateescape, as a caffemodel name with the same bytes does.
    assert _names(r'"\377"|"\xc3\xa9"|"\ud800x"|"\777"') == [
        b"\xff".decode("utf-8", "surrogateescape"), "é", b"\xed\xa0\x80x".decode("utf-8", "surrogateescape"), "\udcff"]


def test_adjacent_strings_concatenate():
    assert _names('"a" \'b\'|"a"\n "b" "c"|"a" # note\n "b"|"a\\"" "\\x62"') == ["ab", "abc", "ab", 'a"b']
    doc = prototxt.parse('name: "a" # note\n "b" type: X')
    assert [f.name for f in doc.root.fields] == ["name", "type"] and doc.string(doc.root.fields[0]) == "ab"


def test_escaped_name_matches_the_caffemodel(pair):
    text = 'layer {\n  name: "bn\\"1\\142"\n  type: "BatchNorm"\n  bottom: "x"\n  top: "x"\n}\n'
    model = cp.model_bytes(cp.bn_layer('bn"1b', [0.0, 1.0], [1.0, 2.0], param={"use_global_stats": True}))
    pp, mp = pair(text, model=model)
    result = bnfix.patch(pp, mp)
    assert [(r.name, r.status) for r in result.layers] == [('bn"1b', "patched")]


# -- layer helpers -----------------------------------------------------------------------------------

SCALE = ('layer {\n  name: "sc"\n  type: "Scale"\n  bottom: "a"\n  bottom: ["b\\x31", \'c\' "d"]\n  top: "s\\"1"\n'
         '  scale_param { axis: 1 num_axes: -0x1 bias_term: true }\n}\n')


def test_bottoms_tops_and_param_fields():
    layer = prototxt.parse(SCALE).layers()[0]
    assert (layer.bottoms, layer.tops) == (["a", "b1", "cd"], ['s"1'])
    assert layer.param("scale_param").value is not None and layer.param("batch_norm_param") is None
    assert layer.integer(layer.param_field("scale_param", "axis")) == 1
    assert layer.integer(layer.param_field("scale_param", "num_axes")) == -1
    assert layer.boolean(layer.param_field("scale_param", "bias_term")) is True
    assert layer.param_field("scale_param", "filler") is None and layer.bn_field("eps") is None


@pytest.mark.parametrize("body, message", [
    ("  scale_param { axis: 1 }\n  scale_param { axis: 1 }\n", ":8:3: layer 'sc': scale_param given twice"),
    ("  scale_param: 3\n", ":7:3: layer 'sc': scale_param is not a block"),
    ("  scale_param { axis: 1 axis: 2 }\n", ":7:25: layer 'sc': axis given twice"),
    ("  scale_param { axis { } }\n", ":7:17: layer 'sc': axis must be a value"),
])
def test_param_errors(body, message):
    layer = prototxt.parse(f'layer {{\n  name: "sc"\n  type: "Scale"\n  bottom: "a"\n  top: "b"\n\n{body}}}\n', "s.prototxt").layers()[0]
    with pytest.raises(ParseError) as info:
        layer.param_field("scale_param", "axis")
    assert str(info.value) == "s.prototxt" + message


def test_bottom_that_is_not_a_string():
    layer = prototxt.parse('layer { name: "x" bottom: data }', "s.prototxt").layers()[0]
    with pytest.raises(ParseError) as info:
        _ = layer.bottoms
    assert str(info.value) == "s.prototxt:1:27: layer 'x': bottom 'data' is not a string"


def _scalar(value: str):
    return prototxt.parse(f'layer {{ name: "l" p {{ v: {value} }} }}').layers()[0], value


@pytest.mark.parametrize("value, expected", [
    ("1e-5", 1e-5), ("1", 1.0), (".5", 0.5), ("1.", 1.0), ("1.0f", 1.0), ("2F", 2.0), ("-3", -3.0),
    ("0", 0.0), ("0.001", 0.001), ("1E+2", 100.0), ("inf", float("inf")), ("-Infinity", float("-inf")),
])
def test_number_reads_what_protobuf_reads(value, expected):
    layer = _scalar(value)[0]
    assert layer.number(layer.param_field("p", "v")) == expected


@pytest.mark.parametrize("value", ["017", "0x10", "+1", '"1"', "abc", "99999999999999999999", "[1]", "00.5", "- 1"])
def test_number_refuses_what_protobuf_refuses(value):
    try:
        layer = _scalar(value)[0]
    except ParseError:
        return  # refused by the tokenizer already ("- 1")
    with pytest.raises(ParseError, match=r"layer 'l': v .* is not a number$"):
        layer.number(layer.param_field("p", "v"))


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("True", True), ("t", True), ("1", True), ("0x1", True), ("01", True),
    ("false", False), ("False", False), ("f", False), ("0", False), ("00", False),
])
def test_boolean_reads_what_protobuf_reads(value, expected):
    layer = _scalar(value)[0]
    assert layer.boolean(layer.param_field("p", "v")) is expected


@pytest.mark.parametrize("value", ["TRUE", "T", "yes", "2", "-1", '"true"', "1.0"])
def test_boolean_refuses_what_protobuf_refuses(value):
    layer = _scalar(value)[0]
    with pytest.raises(ParseError) as info:
        layer.boolean(layer.param_field("p", "v"))
    assert str(info.value).endswith(f"layer 'l': v {value!r} is not a boolean")


@pytest.mark.parametrize("value, expected", [("1", 1), ("-1", -1), ("0x1F", 31), ("017", 15), ("0", 0),
                                             ("2147483647", 2**31 - 1), ("-2147483648", -(2**31))])
def test_integer(value, expected):
    layer = _scalar(value)[0]
    assert layer.integer(layer.param_field("p", "v")) == expected
    for bad in ("2147483648", "1.0", "09", "true"):
        layer = _scalar(bad)[0]
        with pytest.raises(ParseError, match=f"layer 'l': v '{bad}' is not an integer$"):
            layer.integer(layer.param_field("p", "v"))


def test_eps_must_be_finite():
    layer = prototxt.parse(BN.format(body="  batch_norm_param { eps: -inf }\n"), "e.prototxt").layers()[0]
    with pytest.raises(ParseError) as info:
        _ = layer.eps
    assert str(info.value) == "e.prototxt:6:27: layer 'bn': eps '-inf' is not a finite number >= 0"


# -- checking edits --------------------------------------------------------------------------------

def _check_rereads(paths: list[Path]) -> None:
    for path in paths:
        doc = prototxt.parse(path.read_bytes().decode())
        bns = [lay for lay in doc.layers() if lay.type == "BatchNorm"]
        splices = _edit_all(doc) + [prototxt.Splice(*[doc.line_end(lay.field.start)] * 2, "  # mark", -1) for lay in bns]
        after = doc.check_splices(splices, bns)
        assert [(a.name, a.type, a.index) for a in after] == [(b.name, b.type, b.index) for b in bns]
        assert all(a.eps == 1e-6 and a.doc is not doc for a in after)
        assert doc.check_splices([], bns) == bns


def test_check_splices_rereads_the_edited_layers():
    _check_rereads(SHIPPED)


def test_check_splices_on_the_whole_corpus():
    _check_rereads(corpus_files())


def test_check_splices_refuses_broken_edits():
    text = 'layer { name: "a" type: "ReLU" } layer { name: "bn" type: "BatchNorm" }\nlayer {\n  name: "c"\n}\n'
    doc = prototxt.parse(text, "c.prototxt")
    a, bn, c = doc.layers()
    at = text.index('"BatchNorm"')
    # Layers sharing a line are re-read together: editing bn re-reads a as well.
    assert doc.check_splices([prototxt.Splice(at, at + 11, '"BatchNorm" eps: 1')], [bn])[0].name == "bn"
    relu = text.index('"ReLU"')  # on bn's line, in layer a: allowed, and a is re-read too
    new_bn, new_a = doc.check_splices([prototxt.Splice(relu, relu + 6, '"ReLU" x: 1')], [bn, a])
    assert (new_bn.name, new_a.name, new_a.index) == ("bn", "a", 0) and new_a.body.first("x") is not None
    cases = [
        ([prototxt.Splice(at, at + 11, '"Scale"')], "the edit at c.prototxt:1:34 changed the layers"),
        ([prototxt.Splice(at, at, "{")], "the edit at c.prototxt:1:1 breaks the prototxt"),
        ([prototxt.Splice(3, 3, "x")], "the edit at c.prototxt:1:1 changed the top-level fields"),  # "layx"
        ([prototxt.Splice(len(text) - 2, len(text) - 2, " x: 1")], "edit outside the given layers at c.prototxt:4:1"),
        ([prototxt.Splice(at + 11, at + 11, "} foo {")], "the edit at c.prototxt:1:1 changed the top-level fields"),
    ]
    for splices, message in cases:
        with pytest.raises(AssertionError, match=re.escape(message)):
            doc.check_splices(splices, [bn])
    assert doc.check_splices([prototxt.Splice(text.index('"c"'), text.index('"c"') + 3, '"c"')], [c, bn])[0].name == "c"


# -- reading files -----------------------------------------------------------------------------------

def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.prototxt"
    os.mkfifo(fifo)
    for path, kind in [(fifo, "a FIFO"), (Path("/dev/zero"), "a character device"), (tmp_path, "a directory")]:
        with pytest.raises(InputError) as info:
            prototxt.read(path)  # returns at once: the FIFO has no writer, /dev/zero never ends
        assert str(info.value) == f"{path}: is {kind}, not a regular file"
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'none'))}: no such file$"):
        prototxt.read(tmp_path / "none")
