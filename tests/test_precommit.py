"""The pre-commit hook (``.pre-commit-hooks.yaml``, id ``bnfix-check``) run by the real ``pre-commit``.

pre-commit installs a hook the way a user's ``.pre-commit-config.yaml`` asks: it clones the hook
repository at a commit and ``pip install``s it into a virtualenv of its own (from PyPI:
setuptools, numpy, rich; nothing else is fetched).  The hook repository here is a temporary git
repository holding a copy of this checkout's working tree (top-level files and bnfix/),
committed there, so that the hook file and the code under test are what is on disk now and
nothing is committed in the checkout itself.  The model pairs live in a second temporary git
repository, which uses the hook.

``pre-commit try-repo`` (the headline test) works in a throw-away store, so it installs the hook
environment afresh on every call; the other tests run ``pre-commit run`` with the project's
``.pre-commit-config.yaml`` pointing at the hook repository, whose environment is installed once
per module into a temporary ``PRE_COMMIT_HOME``.  Without ``pre-commit`` or ``git`` the tests
skip, except under ``CI=true``, where they fail: ``pre-commit`` is in the ``test`` extra.
"""


from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnfix.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE_P = REPO / "samples" / "yoloface-50k.prototxt"
SAMPLE_M = REPO / "samples" / "yoloface-50k.caffemodel"
HOOK_ID = "bnfix-check"
HOOK_NAME = "bnfix --check (Caffe BatchNorm from Darknet)"
YOLO_DONE = "23 patched of 23 layers; error 2.1e-02 → 8.5e-08 (not exact in nvcaffe, nvcaffe-0.16.1, caffe2onnx, merge_bn)"
MINIMAL = ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml", "bnfix")  # what `pip install .` needs
GIT_IDENTITY = ["-c", "user.name=bnfix tests", "-c", "user.email=tests@bnfix.invalid", "-c", "commit.gpgsign=false"]


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (under CI it must be: pre-commit is in the test extra)")
    pytest.skip(what)


def _env() -> dict[str, str]:
    """The environment for git and pre-commit: nothing that points git at another repository
    (as when the suite itself runs inside a git hook), and no PYTHONPATH, which would let the
    hook's virtualenv import bnfix from this checkout instead of from what pre-commit installed."""
    drop = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
            "GIT_CEILING_DIRECTORIES", "GIT_PREFIX", "PYTHONPATH", "PYTHONHOME", "NO_COLOR", "FORCE_COLOR")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PRE_COMMIT")}


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _checkout_files() -> list[Path]:
    """What the hook repository needs from this checkout's working tree: its top-level files
    (pyproject.toml, README.md, .pre-commit-hooks.yaml...) and the package, tracked or new but not
    ignored (git ls-files); outside a git checkout (an sdist), the MINIMAL list.  Tests, samples
    and bench are not part of what ``pip install .`` installs, so they are not copied."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          env=_env(), capture_output=True, timeout=120)
    if proc.returncode == 0 and proc.stdout:
        names = [Path(n) for n in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
        keep = [n for n in names if len(n.parts) == 1 or n.parts[0] == "bnfix"]
        return [n for n in keep if (REPO / n).is_file()]  # deleted-but-tracked files left out
    out = []
    for name in MINIMAL:
        p = REPO / name
        out += [f.relative_to(REPO) for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts] \
            if p.is_dir() else [Path(name)]
    return out


@pytest.fixture(scope="module")
def hook(tmp_path_factory) -> dict[str, object]:
    """A committed copy of this checkout (the hook repository), a PRE_COMMIT_HOME with the hook
    environment installed, and the ``.pre-commit-config.yaml`` text that uses it."""
    if importlib.util.find_spec("pre_commit") is None:
        _missing("pre-commit is not installed (pip install pre-commit, or pip install -e '.[test]')")
    if shutil.which("git") is None:
        _missing("git is not installed")
    base = tmp_path_factory.mktemp("precommit")
    repo = base / "hook-repo"
    for rel in _checkout_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    assert (repo / ".pre-commit-hooks.yaml").is_file()
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bnfix working tree, for pre-commit")
    rev = git(repo, "rev-parse", "HEAD").strip()
    env = _env()
    env["PRE_COMMIT_HOME"] = str(base / "cache")
    config = f"repos:\n-   repo: {repo}\n    rev: {rev}\n    hooks:\n    -   id: {HOOK_ID}\n"
    info = {"repo": repo, "env": env, "config": config}
    empty = base / "empty"  # install the environment once, into PRE_COMMIT_HOME
    empty.mkdir()
    git(empty, "init", "-q")
    (empty / ".pre-commit-config.yaml").write_text(config)
    proc = pre_commit(info, empty, "install-hooks")
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if "pip" in text and ("Could not" in text or "No matching distribution" in text or "connection" in text.lower()):
            _missing(f"pre-commit could not install the hook environment (PyPI unreachable?):\n{text[-2000:]}")
        pytest.fail(f"pre-commit install-hooks failed:\n{text}")
    return info


def pre_commit(hook: dict[str, object], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pre_commit", *args], cwd=cwd, env=hook["env"], capture_output=True,
                          text=True, timeout=900)


def try_repo(hook: dict[str, object], project: Path, *args: str) -> subprocess.CompletedProcess:
    """``pre-commit try-repo``: a throw-away store, so the hook environment is installed afresh."""
    return pre_commit(hook, project, "try-repo", str(hook["repo"]), HOOK_ID, "--color", "never", *args)


def run_hook(hook: dict[str, object], project: Path, *args: str) -> subprocess.CompletedProcess:
    """``pre-commit run`` with the project's own config (the environment installed once)."""
    return pre_commit(hook, project, "run", HOOK_ID, "--color", "never", *args)


def verdict(proc: subprocess.CompletedProcess) -> str:
    """The hook's result line: Passed, Failed or Skipped."""
    found = re.findall(rf"^{re.escape(HOOK_NAME)}\.+(?:\(no files to check\))?(Passed|Failed|Skipped)$",
                       proc.stdout, re.M)
    assert len(found) == 1, proc.stdout + proc.stderr
    return found[0]


def hook_output(proc: subprocess.CompletedProcess) -> list[str]:
    """What bnfix printed: the lines after pre-commit's '- hook id' / '- exit code' header."""
    lines = proc.stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(HOOK_NAME))
    return [l for l in lines[start + 1:] if l and not l.startswith("- ")]


@pytest.fixture
def project(tmp_path, hook) -> Path:
    """A git repository using the hook, with a model pair committed (patched for another target),
    then replaced by an unpatched one (as a re-conversion would) and staged; plus a text file."""
    proj = tmp_path / "models-repo"
    (proj / "yolo").mkdir(parents=True)
    (proj / "docs").mkdir()
    (proj / "docs" / "notes.txt").write_text("model zoo\n")
    shutil.copyfile(SAMPLE_P, proj / "yolo" / "face.prototxt")
    shutil.copyfile(SAMPLE_M, proj / "yolo" / "face.caffemodel")
    assert main([str(proj / "yolo" / "face.prototxt"), str(proj / "yolo" / "face.caffemodel"), "--in-place", "-q",
                 "--target", "portable"]) == 0
    for orig in (proj / "yolo").glob("*.orig"):
        orig.unlink()
    (proj / ".pre-commit-config.yaml").write_text(str(hook["config"]))
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "patched model")
    shutil.copyfile(SAMPLE_P, proj / "yolo" / "face.prototxt")  # re-converted: unpatched again
    shutil.copyfile(SAMPLE_M, proj / "yolo" / "face.caffemodel")
    git(proj, "add", "-A")
    return proj


def test_the_manifest_is_valid():
    if importlib.util.find_spec("pre_commit") is None:
        _missing("pre-commit is not installed (pip install pre-commit, or pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "pre_commit", "validate-manifest", str(REPO / ".pre-commit-hooks.yaml")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import yaml  # pre-commit depends on PyYAML

    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hooks == [{
        "id": HOOK_ID, "name": HOOK_NAME,
        "description": "Fail when a changed .prototxt/.caffemodel pair still needs bnfix's BatchNorm eps/variance fix.",
        "entry": "bnfix --check --find-partners", "language": "python", "files": r"\.(prototxt|caffemodel)$",
        "pass_filenames": True, "require_serial": True,
    }]


def test_the_installed_hook_has_every_bnfix_module(hook, project):
    """Regression: pyproject once packaged bnfix but not bnfix.strategies, so every non-editable
    install (pip install ., a wheel, this hook) ended in 'internal error: ModuleNotFoundError'."""
    proc = run_hook(hook, project, "--files", "yolo/face.prototxt", "yolo/face.caffemodel")
    assert "No module named" not in proc.stdout
    assert "internal error" not in proc.stdout
    assert "- exit code: 1" in proc.stdout


def test_hook_fails_on_a_changed_pair_that_needs_work_and_passes_once_fixed(hook, project):
    proc = try_repo(hook, project, "--files", "yolo/face.prototxt", "yolo/face.caffemodel", "docs/notes.txt")
    assert proc.returncode == 1
    assert verdict(proc) == "Failed"
    assert "- exit code: 1" in proc.stdout  # bnfix's own: work to do (2 would be an input error)
    out = hook_output(proc)
    assert out[0] == f"yolo/face.prototxt + face.caffemodel: {YOLO_DONE}"
    assert out[-1] == ("total: 1 pair(s), 23 layers patched, 0 reverted, 0 up to date, 0 skipped; "
                       "worst error 2.1e-02 → 8.5e-08; 0 pair(s) failed")
    assert git(project, "status", "--porcelain") == "M  yolo/face.caffemodel\nM  yolo/face.prototxt\n"  # untouched

    assert main([str(project / "yolo" / "face.prototxt"), str(project / "yolo" / "face.caffemodel"),
                 "--in-place", "-q"]) == 0
    proc = try_repo(hook, project, "--files", "yolo/face.prototxt", "yolo/face.caffemodel", "docs/notes.txt")
    assert (proc.returncode, verdict(proc)) == (0, "Passed"), proc.stdout


def test_hook_finds_the_partner_of_the_one_file_that_changed(hook, project):
    proc = run_hook(hook, project, "--files", "yolo/face.caffemodel")
    assert (proc.returncode, verdict(proc)) == (1, "Failed")
    assert "- exit code: 1" in proc.stdout
    assert hook_output(proc)[0] == "yolo/face.prototxt + yolo/face.caffemodel"  # one pair: its table


def test_hook_on_a_commit_checks_what_is_staged(hook, project):
    """No --files: pre-commit checks the staged files, as ``git commit`` would, with unstaged
    changes stashed away; a fix that is not staged yet does not count."""
    proc = run_hook(hook, project)
    assert (proc.returncode, verdict(proc)) == (1, "Failed")
    assert hook_output(proc)[0] == f"yolo/face.prototxt + face.caffemodel: {YOLO_DONE}"

    assert main([str(project / "yolo" / "face.prototxt"), str(project / "yolo" / "face.caffemodel"),
                 "--in-place", "-q"]) == 0
    proc = run_hook(hook, project)  # fixed in the work tree, but the index still holds the old pair
    assert (proc.returncode, verdict(proc)) == (1, "Failed")
    git(project, "add", "yolo/face.prototxt", "yolo/face.caffemodel")
    proc = run_hook(hook, project)
    assert (proc.returncode, verdict(proc)) == (0, "Passed"), proc.stdout


def test_hook_over_all_files_names_only_the_pairs_that_need_work(hook, project):
    other = project / "tiny"
    other.mkdir()
    shutil.copyfile(SAMPLE_P, other / "tiny_deploy.prototxt")
    shutil.copyfile(SAMPLE_M, other / "tiny.caffemodel")
    shutil.copyfile(SAMPLE_M, project / "yolo" / "face.bnfix.caffemodel")  # an output: never an input
    git(project, "add", "-A")
    assert main([str(project / "yolo" / "face.prototxt"), str(project / "yolo" / "face.caffemodel"),
                 "--in-place", "-q"]) == 0
    git(project, "add", "-A")
    proc = run_hook(hook, project, "--all-files")
    assert (proc.returncode, verdict(proc)) == (1, "Failed")
    out = hook_output(proc)
    assert [l for l in out if not l.startswith("  note: ")] == [
        f"tiny/tiny_deploy.prototxt + tiny.caffemodel: {YOLO_DONE}",
        "total: 2 pair(s), 23 layers patched, 0 reverted, 23 up to date, 0 skipped; worst error 2.1e-02 → 8.5e-08; "
        "0 pair(s) failed, 1 file(s) unpaired"]


def test_hook_passes_a_commit_of_a_solver(hook, project):
    (project / "yolo" / "solver.prototxt").write_text('net: "train_val.prototxt"\nbase_lr: 0.001\n')
    git(project, "add", "-A")
    assert main([str(project / "yolo" / "face.prototxt"), str(project / "yolo" / "face.caffemodel"),
                 "--in-place", "-q"]) == 0
    git(project, "add", "-A")
    proc = run_hook(hook, project, "--files", "yolo/solver.prototxt")
    assert (proc.returncode, verdict(proc)) == (0, "Passed"), proc.stdout
