"""Pair discovery: every rule, layout and reason with its exact result, and the walk's edge cases.

The rules are tested on bare names (``pair_names``, no file system), the walk on real trees in
``tmp_path`` (symlinks, FIFOs, excluded and unreadable directories), and laziness by counting.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import shared_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfix import discover
from bnfix.discover import (
    Pair,
    Rule,
    Unpaired,
    Why,
    pair_names,
    pair_of,
    pairs_of,
    walk,
)

SAME, DNAME, SNAP, LONE = "same-name", "deploy-name", "snapshot", "lone-deploy"


def rows(results, root: Path | None = None) -> list[tuple[str, ...]]:
    """Results as plain tuples: ('pair', prototxt, caffemodel, rule, rel) or (path, kind, reason);
    paths relative to ``root`` when given, in posix form."""

    def s(p: Path) -> str:
        return (p.relative_to(root) if root is not None else p).as_posix()

    out: list[tuple[str, ...]] = []
    for r in results:
        if isinstance(r, Pair):
            out.append(("pair", s(r.prototxt), s(r.caffemodel), r.rule.value, r.rel.as_posix()))
        else:
            assert isinstance(r, Unpaired)
            out.append((s(r.path), r.kind.value, r.reason))
    return out


def pair(p: str, c: str, rule: str, rel: str = ".") -> tuple[str, ...]:
    return ("pair", p, c, rule, rel)


def make(root: Path, *paths: str) -> Path:
    """Empty files (and directories, for names ending in '/') under ``root``."""
    for rel in paths:
        target = root / rel
        if rel.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    return root


# ---------------------------------------------------------------------------------------------
# The rules, on names


RULES = {
    "same-name": (
        ["yolov3.prototxt", "yolov3.caffemodel"],
        [pair("yolov3.prototxt", "yolov3.caffemodel", SAME)],
    ),
    "same-name, suffixes in any case": (
        ["Yolo.PROTOTXT", "Yolo.CaffeModel"],
        [pair("Yolo.PROTOTXT", "Yolo.CaffeModel", SAME)],
    ),
    "the model's own name must match exactly": (
        ["yolo.prototxt", "Yolo.caffemodel"],
        [("Yolo.caffemodel", "no-partner", "no Yolo.prototxt or Yolo_deploy.prototxt beside it"),
         ("yolo.prototxt", "no-partner", "no yolo.caffemodel beside it")],
    ),
    "deploy-name, underscore": (
        ["VGG_ILSVRC_16_layers_deploy.prototxt", "VGG_ILSVRC_16_layers.caffemodel"],
        [pair("VGG_ILSVRC_16_layers_deploy.prototxt", "VGG_ILSVRC_16_layers.caffemodel", DNAME)],
    ),
    "deploy-name, hyphen and any case": (
        ["ResNet-50-Deploy.prototxt", "ResNet-50.caffemodel"],
        [pair("ResNet-50-Deploy.prototxt", "ResNet-50.caffemodel", DNAME)],
    ),
    "snapshot: the corpus layout S_deploy + S_deploy_iter_N": (
        ["mobilenet_yolov3_lite_deploy.prototxt", "mobilenet_yolov3_lite_deploy_iter_50000.caffemodel"],
        [pair("mobilenet_yolov3_lite_deploy.prototxt", "mobilenet_yolov3_lite_deploy_iter_50000.caffemodel", SNAP)],
    ),
    "snapshot: S_deploy + S_iter_N": (
        ["yolo_deploy.prototxt", "yolo_iter_100.caffemodel"],
        [pair("yolo_deploy.prototxt", "yolo_iter_100.caffemodel", SNAP)],
    ),
    "snapshot: the highest N as a number wins, across both spellings": (
        ["yolo_deploy.prototxt", "yolo_iter_900.caffemodel", "yolo_iter_10000.caffemodel",
         "yolo_deploy_iter_5000.caffemodel"],
        [pair("yolo_deploy.prototxt", "yolo_iter_10000.caffemodel", SNAP),
         ("yolo_deploy_iter_5000.caffemodel", "older-snapshot",
          "an older snapshot: yolo_iter_10000.caffemodel is the newest for yolo_deploy.prototxt"),
         ("yolo_iter_900.caffemodel", "older-snapshot",
          "an older snapshot: yolo_iter_10000.caffemodel is the newest for yolo_deploy.prototxt")],
    ),
    "snapshot: two newest with the same N are ambiguous": (
        ["yolo_deploy.prototxt", "yolo_iter_100.caffemodel", "yolo_deploy_iter_0100.caffemodel",
         "yolo_iter_50.caffemodel"],
        [("yolo_deploy.prototxt", "ambiguous",
          "ambiguous: 2 snapshots of iteration 100 (yolo_deploy_iter_0100.caffemodel and yolo_iter_100.caffemodel)"),
         ("yolo_deploy_iter_0100.caffemodel", "ambiguous",
          "ambiguous: one of 2 .caffemodel files that yolo_deploy.prototxt matches equally"),
         ("yolo_iter_100.caffemodel", "ambiguous",
          "ambiguous: one of 2 .caffemodel files that yolo_deploy.prototxt matches equally"),
         ("yolo_iter_50.caffemodel", "older-snapshot",
          "an older snapshot for yolo_deploy.prototxt, whose newest are ambiguous")],
    ),
    "snapshot: only for a deploy-named prototxt": (
        ["yolo.prototxt", "yolo_iter_100.caffemodel"],
        [("yolo.prototxt", "no-partner", "no yolo.caffemodel beside it"),
         ("yolo_iter_100.caffemodel", "no-partner", "no yolo_deploy.prototxt beside this snapshot")],
    ),
    "lone-deploy: the BVLC zoo layout": (
        ["deploy.prototxt", "solver.prototxt", "train_val.prototxt", "bvlc_alexnet.caffemodel", "readme.md"],
        [pair("deploy.prototxt", "bvlc_alexnet.caffemodel", LONE),
         ("solver.prototxt", "not-a-net", "a solver, not a net"),
         ("train_val.prototxt", "training-net",
          "named as a train net, not a deploy net, and no train_val.caffemodel is beside it")],
    ),
    "lone-deploy: one series of snapshots counts as one caffemodel, its newest": (
        ["deploy.prototxt", "caffenet_train_iter_1000.caffemodel", "caffenet_train_iter_2000.caffemodel"],
        [("caffenet_train_iter_1000.caffemodel", "older-snapshot",
          "an older snapshot: caffenet_train_iter_2000.caffemodel is the newest for deploy.prototxt"),
         pair("deploy.prototxt", "caffenet_train_iter_2000.caffemodel", LONE)],
    ),
    "lone-deploy: two caffemodels are ambiguous": (
        ["deploy.prototxt", "a.caffemodel", "b.caffemodel"],
        [("a.caffemodel", "ambiguous", "ambiguous: one of 2 .caffemodel files that deploy.prototxt matches equally"),
         ("b.caffemodel", "ambiguous", "ambiguous: one of 2 .caffemodel files that deploy.prototxt matches equally"),
         ("deploy.prototxt", "ambiguous",
          "ambiguous: 2 .caffemodel files beside it, none named for it (a.caffemodel and b.caffemodel)")],
    ),
    "lone-deploy: a caffemodel and snapshots of its name are two answers": (
        ["deploy.prototxt", "x.caffemodel", "x_iter_5.caffemodel", "y_iter_1.caffemodel", "z.caffemodel"],
        [("deploy.prototxt", "ambiguous", ("ambiguous: 4 .caffemodel files beside it, none named for it "
                                          "(x.caffemodel, x_iter_5.caffemodel, y_iter_1.caffemodel and 1 more)")),
         *[(c, "ambiguous", "ambiguous: one of 4 .caffemodel files that deploy.prototxt matches equally")
           for c in ("x.caffemodel", "x_iter_5.caffemodel", "y_iter_1.caffemodel", "z.caffemodel")]],
    ),
    "lone-deploy: nothing beside it": (
        ["deploy.prototxt"],
        [("deploy.prototxt", "no-partner", "no .caffemodel beside it")],
    ),
    "lone-deploy: every caffemodel is paired already": (
        ["deploy.prototxt", "x.prototxt", "x.caffemodel"],
        [("deploy.prototxt", "no-partner", "no unpaired .caffemodel beside it"),
         pair("x.prototxt", "x.caffemodel", SAME)],
    ),
    "lone-deploy: not for S_deploy, whose name says which model it is": (
        ["yolo_deploy.prototxt", "tiny.caffemodel"],
        [("tiny.caffemodel", "no-partner", "no tiny.prototxt or tiny_deploy.prototxt beside it"),
         ("yolo_deploy.prototxt", "no-partner",
          "no yolo_deploy.caffemodel, yolo.caffemodel or snapshot yolo_iter_N.caffemodel beside it")],
    ),
    "precedence: same-name beats deploy-name": (
        ["yolo.prototxt", "yolo_deploy.prototxt", "yolo.caffemodel"],
        [pair("yolo.prototxt", "yolo.caffemodel", SAME),
         ("yolo_deploy.prototxt", "partner-taken",
          ("yolo.caffemodel would match it by the deploy-name rule, but is paired with yolo.prototxt by the "
          "same-name rule"))],
    ),
    "precedence: deploy-name beats snapshot": (
        ["yolo_deploy.prototxt", "yolo.caffemodel", "yolo_iter_5000.caffemodel"],
        [pair("yolo_deploy.prototxt", "yolo.caffemodel", DNAME),
         ("yolo_iter_5000.caffemodel", "partner-taken",
          ("yolo_deploy.prototxt would match it by the snapshot rule, but is paired with yolo.caffemodel by the "
          "deploy-name rule"))],
    ),
    "precedence: same-name beats snapshot": (
        ["yolo_deploy.prototxt", "yolo_deploy.caffemodel", "yolo_deploy_iter_10.caffemodel"],
        [pair("yolo_deploy.prototxt", "yolo_deploy.caffemodel", SAME),
         ("yolo_deploy_iter_10.caffemodel", "partner-taken",
          ("yolo_deploy.prototxt would match it by the snapshot rule, but is paired with yolo_deploy.caffemodel "
          "by the same-name rule"))],
    ),
    "precedence: lone-deploy takes what the other rules left": (
        ["deploy.prototxt", "yolo_deploy.prototxt", "yolo_iter_1.caffemodel", "yolo_iter_2.caffemodel",
         "bvlc.caffemodel"],
        [pair("deploy.prototxt", "bvlc.caffemodel", LONE),
         pair("yolo_deploy.prototxt", "yolo_iter_2.caffemodel", SNAP),
         ("yolo_iter_1.caffemodel", "older-snapshot",
          "an older snapshot: yolo_iter_2.caffemodel is the newest for yolo_deploy.prototxt")],
    ),
    "ambiguous: two prototxts match one caffemodel by one rule": (
        ["a_deploy.prototxt", "a-deploy.prototxt", "a.caffemodel"],
        [("a-deploy.prototxt", "ambiguous",
          "ambiguous: a_deploy.prototxt matches the same .caffemodel by the deploy-name rule"),
         ("a.caffemodel", "ambiguous", ("ambiguous: a-deploy.prototxt and a_deploy.prototxt match it by the "
                                       "deploy-name rule")),
         ("a_deploy.prototxt", "ambiguous",
          "ambiguous: a-deploy.prototxt matches the same .caffemodel by the deploy-name rule")],
    ),
    "ambiguous: same name, suffixes differing in case": (
        ["x.prototxt", "x.caffemodel", "x.CAFFEMODEL"],
        [("x.CAFFEMODEL", "ambiguous", "ambiguous: one of 2 .caffemodel files that x.prototxt matches equally"),
         ("x.caffemodel", "ambiguous", "ambiguous: one of 2 .caffemodel files that x.prototxt matches equally"),
         ("x.prototxt", "ambiguous", ("ambiguous: 2 .caffemodel files match it by the same-name rule "
                                     "(x.CAFFEMODEL and x.caffemodel)"))],
    ),
    "ambiguous: an ambiguous prototxt explains the caffemodel it would have matched": (
        ["x_deploy.prototxt", "x_deploy.PROTOTXT", "x_deploy.caffemodel", "x.caffemodel"],
        [("x.caffemodel", "partner-taken",
          "x_deploy.PROTOTXT would match it by the deploy-name rule, but is itself unpaired (ambiguous)"),
         ("x_deploy.PROTOTXT", "ambiguous",
          "ambiguous: x_deploy.prototxt matches the same .caffemodel by the same-name rule"),
         ("x_deploy.caffemodel", "ambiguous",
          "ambiguous: x_deploy.PROTOTXT and x_deploy.prototxt match it by the same-name rule"),
         ("x_deploy.prototxt", "ambiguous",
          "ambiguous: x_deploy.PROTOTXT matches the same .caffemodel by the same-name rule")],
    ),
    "training nets pair by the same name (a converted X_test.cfg)": (
        ["yolov3_test.prototxt", "yolov3_test.caffemodel"],
        [pair("yolov3_test.prototxt", "yolov3_test.caffemodel", SAME)],
    ),
    "training nets never take a snapshot": (
        ["yolo_train.prototxt", "yolo_train_iter_100.caffemodel", "yolo_test.prototxt",
         "lenet_train_test.prototxt", "yolov2-544_TEST.prototxt", "trainval.prototxt"],
        [("lenet_train_test.prototxt", "training-net",
          "named as a train net, not a deploy net, and no lenet_train_test.caffemodel is beside it"),
         ("trainval.prototxt", "training-net",
          "named as a trainval net, not a deploy net, and no trainval.caffemodel is beside it"),
         ("yolo_test.prototxt", "training-net",
          "named as a test net, not a deploy net, and no yolo_test.caffemodel is beside it"),
         ("yolo_train.prototxt", "training-net",
          "named as a train net, not a deploy net, and no yolo_train.caffemodel is beside it"),
         ("yolo_train_iter_100.caffemodel", "no-partner", "no yolo_train_deploy.prototxt beside this snapshot"),
         ("yolov2-544_TEST.prototxt", "training-net",
          "named as a test net, not a deploy net, and no yolov2-544_TEST.caffemodel is beside it")],
    ),
    "the word deploy wins over training words; words are whole": (
        ["yolo_test_deploy.prototxt", "yolo_test.caffemodel", "latest.prototxt", "latest.caffemodel",
         "val_test_deploy.prototxt", "contest.prototxt"],
        [("contest.prototxt", "no-partner", "no contest.caffemodel beside it"),
         pair("latest.prototxt", "latest.caffemodel", SAME),
         ("val_test_deploy.prototxt", "no-partner", ("no val_test_deploy.caffemodel, val_test.caffemodel or "
                                                    "snapshot val_test_iter_N.caffemodel beside it")),
         pair("yolo_test_deploy.prototxt", "yolo_test.caffemodel", DNAME)],
    ),
    "solvers and label maps never pair, even by the same name": (
        ["solver.prototxt", "solver.caffemodel", "cifar10_quick_solver_lr1.prototxt", "labelmap_voc.prototxt",
         "label_map.prototxt"],
        [("cifar10_quick_solver_lr1.prototxt", "not-a-net", "a solver, not a net"),
         ("label_map.prototxt", "not-a-net", "a label map, not a net"),
         ("labelmap_voc.prototxt", "not-a-net", "a label map, not a net"),
         ("solver.caffemodel", "partner-taken",
          "solver.prototxt would match it by the same-name rule, but is itself unpaired (not-a-net)"),
         ("solver.prototxt", "not-a-net", "a solver, not a net")],
    ),
    "left-over caffemodels say what they looked for": (
        ["yolo.caffemodel", "yolo_iter_5.caffemodel", "net_deploy_iter_7.caffemodel"],
        [("net_deploy_iter_7.caffemodel", "no-partner", "no net_deploy.prototxt beside this snapshot"),
         ("yolo.caffemodel", "no-partner", "no yolo.prototxt or yolo_deploy.prototxt beside it"),
         ("yolo_iter_5.caffemodel", "no-partner", "no yolo_deploy.prototxt beside this snapshot")],
    ),
    "other file types are ignored silently": (
        ["x.cfg", "x.weights", "x.caffemodel.h5", "x.prototxt.txt", ".prototxt", ".caffemodel", "x.solverstate"],
        [],
    ),
    "names with spaces and other scripts": (
        ["my model.prototxt", "my model.caffemodel", "modèle_深度_deploy.prototxt", "modèle_深度.caffemodel",
         "обучение_train.prototxt"],
        [pair("modèle_深度_deploy.prototxt", "modèle_深度.caffemodel", DNAME),
         pair("my model.prototxt", "my model.caffemodel", SAME),
         ("обучение_train.prototxt", "training-net",
          "named as a train net, not a deploy net, and no обучение_train.caffemodel is beside it")],
    ),
}


@pytest.mark.parametrize("case", RULES, ids=list(RULES))
def test_rule(case):
    names, expected = RULES[case]
    assert rows(pair_names(names)) == expected
    assert rows(pair_names(reversed(names))) == expected  # the listing's order does not matter


_STEMS = st.sampled_from(["yolo", "Yolo", "a", "deploy", "Deploy", "solver", "train_val", "x_test", "labelmap"])
_NAMES = st.builds(
    lambda stem, deploy, it, suffix: f"{stem}{deploy}{it}{suffix}",
    _STEMS, st.sampled_from(["", "_deploy", "-deploy"]),
    st.sampled_from(["", "_iter_1", "_iter_2", "_iter_02", "_iter_10"]),
    st.sampled_from([".prototxt", ".caffemodel", ".CAFFEMODEL", ".bnfix.caffemodel", ".txt"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_NAMES, max_size=12), st.randoms())
def test_every_model_file_comes_out_once_and_pairs_follow_their_rule(names, rnd):
    found = pair_names(names)
    shuffled = list(names)
    rnd.shuffle(shuffled)
    assert pair_names(shuffled) == found  # the order of the listing never matters
    out = [str(p) for r in found for p in ((r.prototxt, r.caffemodel) if isinstance(r, Pair) else (r.path,))]
    models = {n for n in names if discover.model_suffix(n) and not discover.is_bnfix_name(n)}
    assert sorted(out) == sorted(models)  # a partition: each model file exactly once
    for r in found:
        if isinstance(r, Unpaired):
            assert r.reason and isinstance(r.kind, Why)
            continue
        p, c = discover._stem(str(r.prototxt)), discover._stem(str(r.caffemodel))
        assert str(r.prototxt).lower().endswith(".prototxt") and str(r.caffemodel).lower().endswith(".caffemodel")
        if r.rule is Rule.SAME_NAME:
            assert p == c
        elif r.rule is Rule.DEPLOY_NAME:
            assert p in (f"{c}_deploy", f"{c}-deploy")
        elif r.rule is Rule.SNAPSHOT:
            prefix = c[: c.lower().rindex("_iter_")]
            assert p == prefix or p in (f"{prefix}_deploy", f"{prefix}-deploy")
        else:
            assert p.lower() == "deploy"


def test_rule_and_kind_values_print_as_themselves():
    assert [str(r) for r in Rule] == [SAME, DNAME, SNAP, LONE]
    assert f"{Why.OUTSIDE_TREE}" == "outside-tree"
    assert json.dumps([Rule.SNAPSHOT, Why.ERROR]) == '["snapshot", "error"]'


def test_the_docstring_spec_names_every_rule_and_kind():
    doc = discover.__doc__ or ""
    assert [r.value for r in Rule if f"**{r.value}**" not in doc] == []
    assert [w.value for w in Why if f"\n{w.value} " not in doc] == []


# ---------------------------------------------------------------------------------------------
# Walking real trees


def test_nested_tree_order_and_rel(tmp_path):
    make(tmp_path, "b.prototxt", "b.caffemodel", "notes.txt",
         "zoo/alexnet/deploy.prototxt", "zoo/alexnet/bvlc_alexnet.caffemodel", "zoo/alexnet/solver.prototxt",
         "zoo/a.prototxt",
         "a/yolo.prototxt", "a/yolo.caffemodel", "a/z/q_deploy.prototxt", "a/z/q_iter_9.caffemodel",
         "empty/")
    assert rows(walk(tmp_path), tmp_path) == [
        pair("b.prototxt", "b.caffemodel", SAME),  # a directory's own files first
        pair("a/yolo.prototxt", "a/yolo.caffemodel", SAME, "a"),  # then its subdirectories, by name
        pair("a/z/q_deploy.prototxt", "a/z/q_iter_9.caffemodel", SNAP, "a/z"),
        ("zoo/a.prototxt", "no-partner", "no a.caffemodel beside it"),
        pair("zoo/alexnet/deploy.prototxt", "zoo/alexnet/bvlc_alexnet.caffemodel", LONE, "zoo/alexnet"),
        ("zoo/alexnet/solver.prototxt", "not-a-net", "a solver, not a net"),
    ]


def test_paths_keep_the_callers_spelling_of_root(tmp_path, monkeypatch):
    make(tmp_path, "m/x.prototxt", "m/x.caffemodel")
    monkeypatch.chdir(tmp_path)
    assert list(walk(Path("m"))) == [Pair(Path("m/x.prototxt"), Path("m/x.caffemodel"), Path("."), Rule.SAME_NAME)]
    assert list(walk(Path("."))) == [Pair(Path("m/x.prototxt"), Path("m/x.caffemodel"), Path("m"), Rule.SAME_NAME)]


def test_the_real_corpus_layouts():
    models = shared_corpus("models")
    assert rows(walk(models), models) == [
        pair("dog-qiuqiu-mobilenetv2-yolov3-nano-voc/MobileNetV2-YOLOv3-Nano-voc.prototxt",
             "dog-qiuqiu-mobilenetv2-yolov3-nano-voc/MobileNetV2-YOLOv3-Nano-voc.caffemodel", SAME,
             "dog-qiuqiu-mobilenetv2-yolov3-nano-voc"),
        pair("dog-qiuqiu-yoloface-50k/yoloface-50k.prototxt", "dog-qiuqiu-yoloface-50k/yoloface-50k.caffemodel",
             SAME, "dog-qiuqiu-yoloface-50k"),
        pair("eric612-tusimple-mobilenet-yolov3-lite/mobilenet_yolov3_lite_deploy.prototxt",
             "eric612-tusimple-mobilenet-yolov3-lite/mobilenet_yolov3_lite_deploy_iter_50000.caffemodel", SNAP,
             "eric612-tusimple-mobilenet-yolov3-lite"),
    ]


def test_root_that_is_missing_or_a_file(tmp_path):
    make(tmp_path, "f.prototxt")
    assert rows(walk(tmp_path / "nope"), tmp_path) == [("nope", "error", "cannot examine it: No such file or directory")]
    assert rows(walk(tmp_path / "f.prototxt"), tmp_path) == [("f.prototxt", "error", "not a directory")]


def test_vcs_directories_are_skipped(tmp_path):
    make(tmp_path, ".git/x.prototxt", ".git/x.caffemodel", ".hg/y.prototxt", ".svn/z.caffemodel",
         "sub/.git/w.prototxt", ".github/wf.prototxt", ".hidden.prototxt", ".hidden.caffemodel")
    assert rows(walk(tmp_path), tmp_path) == [
        pair(".hidden.prototxt", ".hidden.caffemodel", SAME),  # other dot-names are walked
        (".github/wf.prototxt", "no-partner", "no wf.caffemodel beside it"),
    ]


def test_bnfix_outputs_temps_and_backups_are_skipped(tmp_path):
    make(tmp_path, "yolo.prototxt", "yolo.caffemodel", "yolo.bnfix.prototxt", "yolo.bnfix.caffemodel",
         "YOLO.BNFIX.PROTOTXT", ".yolo.caffemodel.0a1b2c3d4e5f.bnfix-tmp", "yolo.caffemodel.orig",
         "yolo.prototxt.orig", "yolo.caffemodel.bnfix-old", "yolo.bnfix-lock",
         "work.bnfix-tmp/a.prototxt", "work.bnfix-tmp/a.caffemodel", "backup.orig/b.prototxt")
    assert rows(walk(tmp_path), tmp_path) == [pair("yolo.prototxt", "yolo.caffemodel", SAME)]


def test_excluded_output_directory_inside_the_tree(tmp_path):
    make(tmp_path, "m/x.prototxt", "m/x.caffemodel", "out/m/x.prototxt", "out/m/x.caffemodel")
    expected = [pair("m/x.prototxt", "m/x.caffemodel", SAME, "m")]
    assert rows(walk(tmp_path, exclude=[tmp_path / "out"]), tmp_path) == expected
    # another spelling of the same directory, and an exclude that does not exist, change nothing
    spelled = tmp_path / "m" / ".." / "out"
    assert rows(walk(tmp_path, exclude=[spelled, tmp_path / "missing"]), tmp_path) == expected


def test_excluded_output_directory_created_during_the_walk(tmp_path):
    """``-o z/out`` is created when the first pair is written, after the walk has started but
    before ``z`` is listed: it is skipped by its path, as it had no identity at the start."""
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "z/y.prototxt", "z/y.caffemodel")
    found = walk(tmp_path, exclude=[tmp_path / "z" / "out"])
    first = next(found)
    make(tmp_path, "z/out/a/x.prototxt", "z/out/a/x.caffemodel")  # what a mirroring -o writes
    assert rows([first, *found], tmp_path) == [pair("a/x.prototxt", "a/x.caffemodel", SAME, "a"),
                                               pair("z/y.prototxt", "z/y.caffemodel", SAME, "z")]


def test_exclude_prunes_subdirectories_not_the_root(tmp_path):
    make(tmp_path, "x.prototxt", "x.caffemodel")
    assert rows(walk(tmp_path, exclude=[tmp_path]), tmp_path) == [pair("x.prototxt", "x.caffemodel", SAME)]


def test_symlinked_directory_inside_the_tree_is_walked_once_by_its_real_path(tmp_path):
    make(tmp_path, "v3/x.prototxt", "v3/x.caffemodel")
    (tmp_path / "current").symlink_to("v3")  # sorts before v3
    (tmp_path / "v3" / "self").symlink_to(".")
    (tmp_path / "v3" / "up").symlink_to("..")  # a loop back to the root
    assert rows(walk(tmp_path), tmp_path) == [pair("v3/x.prototxt", "v3/x.caffemodel", SAME, "v3")]


def test_symlinked_directory_outside_the_tree_is_reported_not_followed(tmp_path):
    tree = make(tmp_path / "tree", "x.prototxt", "x.caffemodel")
    make(tmp_path, "elsewhere/y.prototxt", "elsewhere/y.caffemodel")
    (tree / "shared").symlink_to(tmp_path / "elsewhere")
    (tree / "parent").symlink_to("..")  # a loop through the tree's parent
    assert rows(walk(tree), tree) == [
        ("parent", "outside-tree", f"a symlink to a directory outside the tree ({tmp_path}); not followed"),
        ("shared", "outside-tree",
         f"a symlink to a directory outside the tree ({tmp_path / 'elsewhere'}); not followed"),
        pair("x.prototxt", "x.caffemodel", SAME),
    ]


def test_symlinked_files(tmp_path):
    tree = make(tmp_path / "tree", "annex/objects/SHA256-abc", "m/yolo.prototxt", "n/z.prototxt")
    make(tmp_path, "outside.caffemodel")
    (tree / "m" / "yolo.caffemodel").symlink_to("../annex/objects/SHA256-abc")  # git-annex style
    (tree / "n" / "z.caffemodel").symlink_to(tmp_path / "outside.caffemodel")
    (tree / "n" / "gone.caffemodel").symlink_to("missing.caffemodel")
    (tree / "n" / "gone.txt").symlink_to("missing.txt")  # not a model name: ignored
    (tree / "n" / "p.caffemodel").symlink_to("q.caffemodel")
    (tree / "n" / "q.caffemodel").symlink_to("p.caffemodel")
    loop = os.strerror(40) if sys.platform.startswith("linux") else None
    got = rows(walk(tree), tree)
    if loop is None:  # the ELOOP text differs by platform
        got = [r for r in got if r[0] not in ("n/p.caffemodel", "n/q.caffemodel")]
    assert got == [
        pair("m/yolo.prototxt", "m/yolo.caffemodel", SAME, "m"),
        ("n/gone.caffemodel", "broken-symlink", "a broken symlink (to missing.caffemodel)"),
        *([("n/p.caffemodel", "error", f"cannot follow this symlink: {loop}"),
           ("n/q.caffemodel", "error", f"cannot follow this symlink: {loop}")] if loop else []),
        ("n/z.caffemodel", "outside-tree",
         f"a symlink to a file outside the tree ({tmp_path / 'outside.caffemodel'}); not followed"),
        ("n/z.prototxt", "no-partner", "no z.caffemodel beside it"),
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_are_reported_and_never_opened(tmp_path, monkeypatch):
    make(tmp_path, "x.prototxt", "w.caffemodel/y.prototxt", "w.caffemodel/y.caffemodel")
    os.mkfifo(tmp_path / "x.caffemodel")
    os.mkfifo(tmp_path / "pipe")  # no model name: ignored
    (tmp_path / "link.caffemodel").symlink_to("x.caffemodel")

    def no_open(*args, **kwargs):
        raise AssertionError(f"discovery opened {args[0]}")

    monkeypatch.setattr(os, "open", no_open)
    monkeypatch.setattr("builtins.open", no_open)
    assert rows(walk(tmp_path), tmp_path) == [
        ("link.caffemodel", "not-regular", "not a regular file (a FIFO); not opened"),
        ("x.caffemodel", "not-regular", "not a regular file (a FIFO); not opened"),
        ("x.prototxt", "no-partner", "no x.caffemodel beside it"),
        pair("w.caffemodel/y.prototxt", "w.caffemodel/y.caffemodel", SAME, "w.caffemodel"),  # a directory
    ]


def test_names_with_spaces_unicode_and_undecodable_bytes(tmp_path):
    make(tmp_path, "my models/ein Modell.prototxt", "my models/ein Modell.caffemodel",
         "模型/yolo_deploy.prototxt", "模型/yolo_iter_3.caffemodel")
    expected = [pair("my models/ein Modell.prototxt", "my models/ein Modell.caffemodel", SAME, "my models"),
                pair("模型/yolo_deploy.prototxt", "模型/yolo_iter_3.caffemodel", SNAP, "模型")]
    raw = os.fsencode(tmp_path) + b"/\xff"
    try:
        os.mkdir(raw)
        for suffix in (b".prototxt", b".caffemodel"):
            os.close(os.open(raw + b"/m\xfe" + suffix, os.O_CREAT | os.O_WRONLY, 0o644))
    except (OSError, UnicodeError):
        pass  # a file system that only takes valid names
    else:
        d, m = os.fsdecode(b"\xff"), os.fsdecode(b"m\xfe")
        expected.append(pair(f"{d}/{m}.prototxt", f"{d}/{m}.caffemodel", SAME, d))
    assert rows(walk(tmp_path), tmp_path) == expected


# ---------------------------------------------------------------------------------------------
# Unreadable directories and files: reported, the walk goes on


def _failing_scandir(monkeypatch, bad: Path) -> None:
    real = os.scandir

    def scandir(path):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unlistable_directory_is_reported_and_the_walk_goes_on(tmp_path, monkeypatch):
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "b/y.prototxt", "b/y.caffemodel", "c/z.prototxt",
         "c/z.caffemodel")
    _failing_scandir(monkeypatch, tmp_path / "b")
    assert rows(walk(tmp_path), tmp_path) == [
        pair("a/x.prototxt", "a/x.caffemodel", SAME, "a"),
        ("b", "error", "cannot list this directory: Permission denied"),
        pair("c/z.prototxt", "c/z.caffemodel", SAME, "c"),
    ]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads any directory, whatever its mode (the monkeypatched test covers it)")
def test_unreadable_directory_for_real(tmp_path):
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "b/y.prototxt")
    (tmp_path / "b").chmod(0)
    try:
        assert rows(walk(tmp_path), tmp_path) == [
            pair("a/x.prototxt", "a/x.caffemodel", SAME, "a"),
            ("b", "error", "cannot list this directory: Permission denied"),
        ]
    finally:
        (tmp_path / "b").chmod(0o755)


class _Entry:
    """A directory entry that behaves like ``real`` except where told."""

    def __init__(self, real, *, error: OSError | None = None, st=None):
        self._real, self._error, self._st = real, error, st
        self.name, self.path = real.name, real.path

    def _check(self):
        if self._error is not None:
            raise self._error

    def is_symlink(self):
        self._check()
        return self._real.is_symlink()

    def is_dir(self, *, follow_symlinks=True):
        self._check()
        return self._real.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks=True):
        self._check()
        return self._real.is_file(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks=True):
        self._check()
        return self._st if self._st is not None else self._real.stat(follow_symlinks=follow_symlinks)


def _patch_entries(monkeypatch, change):
    """Make ``os.scandir`` hand out ``change(entry)`` for every entry."""
    real = os.scandir

    class Listing:
        def __init__(self, path):
            self._it = real(path)

        def __enter__(self):
            return (change(e) for e in self._it)

        def __exit__(self, *exc):
            self._it.close()

    monkeypatch.setattr(os, "scandir", Listing)


def test_a_file_whose_type_cannot_be_read_is_reported(tmp_path, monkeypatch):
    make(tmp_path, "x.prototxt", "x.caffemodel", "notes.txt")
    err = PermissionError(13, "Permission denied")
    _patch_entries(monkeypatch, lambda e: _Entry(e, error=err) if e.name in ("x.caffemodel", "notes.txt") else e)
    assert rows(walk(tmp_path), tmp_path) == [
        ("x.caffemodel", "error", "cannot examine it: Permission denied"),
        ("x.prototxt", "no-partner", "no x.caffemodel beside it"),
    ]


def test_a_directory_seen_twice_is_walked_once(tmp_path, monkeypatch):
    """What a bind mount of the root inside itself would do: the same (st_dev, st_ino) again."""
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "a/mnt/y.prototxt", "b/z.prototxt", "b/z.caffemodel")
    root_st = os.stat(tmp_path)
    _patch_entries(monkeypatch, lambda e: _Entry(e, st=root_st) if e.name == "mnt" else e)
    assert rows(walk(tmp_path), tmp_path) == [pair("a/x.prototxt", "a/x.caffemodel", SAME, "a"),
                                              pair("b/z.prototxt", "b/z.caffemodel", SAME, "b")]


# ---------------------------------------------------------------------------------------------
# Laziness and flat memory


def test_walk_is_lazy(tmp_path, monkeypatch):
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "b/y.prototxt", "b/y.caffemodel")
    listed: list[str] = []
    real = os.scandir

    def scandir(path):
        listed.append(Path(path).relative_to(tmp_path).as_posix())
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = walk(tmp_path)
    assert listed == []  # nothing before the first next()
    assert rows([next(found)], tmp_path) == [pair("a/x.prototxt", "a/x.caffemodel", SAME, "a")]
    assert listed == [".", "a"]  # b is not listed yet
    assert rows(found, tmp_path) == [pair("b/y.prototxt", "b/y.caffemodel", SAME, "b")]
    assert listed == [".", "a", "b"]


def test_walk_holds_only_the_current_directorys_results(tmp_path):
    for i in range(12):
        make(tmp_path, f"d{i:02}/m.prototxt", f"d{i:02}/m.caffemodel")
    live = []
    for r in walk(tmp_path):
        assert isinstance(r, Pair)
        del r
        gc.collect()
        live.append(sum(isinstance(o, Pair) for o in gc.get_objects()))
    assert live == [1] * 12  # the one being yielded, never the earlier ones


# ---------------------------------------------------------------------------------------------
# One file at a time (the pre-commit hook's view)


def test_pair_of_finds_the_pair_from_either_file(tmp_path):
    make(tmp_path, "z/yolo_deploy.prototxt", "z/yolo_iter_10.caffemodel", "z/yolo_iter_20.caffemodel")
    want = Pair(tmp_path / "z/yolo_deploy.prototxt", tmp_path / "z/yolo_iter_20.caffemodel", Path("."), Rule.SNAPSHOT)
    assert pair_of(tmp_path / "z/yolo_iter_20.caffemodel") == want
    assert pair_of(tmp_path / "z/yolo_deploy.prototxt") == want
    assert rows([pair_of(tmp_path / "z/yolo_iter_10.caffemodel")], tmp_path) == [
        ("z/yolo_iter_10.caffemodel", "older-snapshot",
         "an older snapshot: yolo_iter_20.caffemodel is the newest for yolo_deploy.prototxt")]
    # the same answer as the walk, with rel taken from root
    assert pair_of(tmp_path / "z/yolo_iter_20.caffemodel", root=tmp_path) == want._replace(rel=Path("z"))
    assert want._replace(rel=Path("z")) in list(walk(tmp_path))


def test_pairs_of_lists_each_directory_once_and_yields_each_pair_once(tmp_path, monkeypatch):
    make(tmp_path, "a/x.prototxt", "a/x.caffemodel", "a/w.prototxt", "b/y.prototxt", "b/y.caffemodel")
    listed: list[Path] = []
    real = os.scandir

    def scandir(path):
        listed.append(Path(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    given = [tmp_path / "b/y.caffemodel", tmp_path / "a/x.caffemodel", tmp_path / "a/x.prototxt",
             tmp_path / "a/./x.prototxt", tmp_path / "b/y.prototxt"]
    assert rows(pairs_of(given), tmp_path) == [pair("a/x.prototxt", "a/x.caffemodel", SAME),
                                               pair("b/y.prototxt", "b/y.caffemodel", SAME)]
    assert sorted(listed) == [tmp_path / "a", tmp_path / "b"]


def test_pair_of_reasons_for_files_the_walk_ignores(tmp_path):
    make(tmp_path, "x.prototxt", "x.caffemodel", "x.bnfix.caffemodel", "notes.txt", "d.caffemodel/")
    given = ["x.bnfix.caffemodel", "notes.txt", "d.caffemodel", "missing.prototxt", ".git"]
    assert rows(pairs_of([tmp_path / g for g in given]), tmp_path) == [
        (".git", "error", "cannot examine it: No such file or directory"),
        ("d.caffemodel", "not-regular", "not a regular file (a directory); not opened"),
        ("missing.prototxt", "error", "cannot examine it: No such file or directory"),
        ("notes.txt", "skipped", "not a .prototxt or .caffemodel file"),
        ("x.bnfix.caffemodel", "skipped", "a bnfix output, temporary file or backup, never an input"),
    ]


def test_pair_of_with_root_follows_symlinks_inside_root(tmp_path):
    make(tmp_path, ".git/annex/objects/K1", "models/yolo.prototxt")
    (tmp_path / "models/yolo.caffemodel").symlink_to("../.git/annex/objects/K1")
    link = tmp_path / "models/yolo.caffemodel"
    assert pair_of(link, root=tmp_path) == Pair(tmp_path / "models/yolo.prototxt", link, Path("models"),
                                                Rule.SAME_NAME)
    target = tmp_path / ".git/annex/objects/K1"
    assert rows([pair_of(link)], tmp_path) == [  # by default the tree is the file's own directory
        ("models/yolo.caffemodel", "outside-tree", f"a symlink to a file outside the tree ({target}); not followed")]
    assert rows([pair_of(link, root=tmp_path / "models" / "sub")], tmp_path) == [
        ("models/yolo.caffemodel", "outside-tree", f"outside the tree {tmp_path / 'models' / 'sub'}")]


def test_pairs_of_unlistable_directory(tmp_path, monkeypatch):
    make(tmp_path, "b/y.prototxt", "b/y.caffemodel")
    _failing_scandir(monkeypatch, tmp_path / "b")
    assert rows(pairs_of([tmp_path / "b/y.prototxt", tmp_path / "b/y.caffemodel"]), tmp_path) == [
        ("b/y.caffemodel", "error", "cannot list its directory: Permission denied"),
        ("b/y.prototxt", "error", "cannot list its directory: Permission denied"),
    ]


def test_pair_of_relative_paths(tmp_path, monkeypatch):
    make(tmp_path, "x.prototxt", "x.caffemodel")
    monkeypatch.chdir(tmp_path)
    assert pair_of(Path("x.caffemodel"), root=Path(".")) == Pair(Path("x.prototxt"), Path("x.caffemodel"), Path("."),
                                                                 Rule.SAME_NAME)


# ---------------------------------------------------------------------------------------------
# Exhaustiveness: every rule and every kind of reason is reachable from the public functions


def test_every_rule_and_kind_is_reachable(tmp_path, monkeypatch):
    tree = make(tmp_path / "t", "same.prototxt", "same.caffemodel", "s_deploy.prototxt", "s.caffemodel",
                "s_iter_1.caffemodel", "n/n_deploy.prototxt", "n/n_iter_1.caffemodel", "n/n_iter_2.caffemodel",
                "l/deploy.prototxt", "l/w.caffemodel", "solver.prototxt", "train.prototxt", "lonely.prototxt",
                "amb/deploy.prototxt", "amb/a.caffemodel", "amb/b.caffemodel", "bad/", "x.bnfix.prototxt")
    make(tmp_path, "out.caffemodel")
    (tree / "o.caffemodel").symlink_to(tmp_path / "out.caffemodel")
    (tree / "b.caffemodel").symlink_to("nothing")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tree / "f.caffemodel")
    _failing_scandir(monkeypatch, tree / "bad")
    found = [*walk(tree), pair_of(tree / "x.bnfix.prototxt")]
    assert {r.rule for r in found if isinstance(r, Pair)} == set(Rule)
    kinds = {r.kind for r in found if isinstance(r, Unpaired)}
    assert kinds | ({Why.NOT_REGULAR} if not hasattr(os, "mkfifo") else set()) == set(Why)
