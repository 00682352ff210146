"""The README is part of the product: its Python example runs, and its tables list every option,
target and runtime that the code knows (so adding one without documenting it fails here)."""

from __future__ import annotations

import re
import shutil

from conftest import REPO

import bnfix
from bnfix import runtimes
from bnfix.cli import _parser

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (block,) = re.findall(r"```python\n(.*?)```", _section("Python API"), re.S)
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "out" / "fixed.prototxt").is_file() and (tmp_path / "out" / "fixed.caffemodel").is_file()
    again = bnfix.patch(tmp_path / "out" / "fixed.prototxt", tmp_path / "out" / "fixed.caffemodel", target="opencv")
    assert not again.needs_work


def test_every_option_is_in_the_usage_table():
    first_column = [line.split("|")[1] for line in _section("Usage").splitlines() if line.startswith("| ")]
    flags = {m for cell in first_column for m in re.findall(r"`(-[\w-]+)", cell)}
    for action in _parser()._actions:
        for flag in action.option_strings:
            assert flag in flags, flag


def test_every_target_and_runtime_is_in_the_targets_section():
    section = _section("Targets")
    for name in bnfix.TARGETS:
        assert f"| `{name}`" in section, name
    for rt in runtimes.RUNTIMES:
        assert rt.name.split("-")[0] in section, rt.name


def test_every_source_preset_is_in_the_sources_table():
    section = _section("Sources")
    for name in bnfix.PRESETS:
        assert f"| `{name}`" in section, name
