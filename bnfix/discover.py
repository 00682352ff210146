"""Find the model pairs in a directory tree: which ``.prototxt`` goes with which ``.caffemodel``.

Pairing looks at file names only, one directory at a time: discovery never opens a file, and a
pair never spans two directories.  It never guesses either: where a rule finds two answers,
every file involved is reported unpaired, with the reason, and can still be given as an explicit
pair.

Pairing rules, in order of precedence
-------------------------------------
A file paired (or reported) by one rule is not available to the rules after it.

1. **same-name**: ``X.prototxt`` + ``X.caffemodel``.  This is how Darknet→Caffe converters name
   their output, so it wins over everything else.
2. **deploy-name**: ``S_deploy.prototxt`` (or ``S-deploy.prototxt``) + ``S.caffemodel``, the
   model-zoo layout (``VGG_ILSVRC_16_layers_deploy.prototxt`` + ``VGG_ILSVRC_16_layers.caffemodel``).
3. **snapshot**: ``S_deploy.prototxt`` + the newest Caffe snapshot of ``S``: a caffemodel named
   ``S_iter_N`` or ``S_deploy_iter_N``, the highest ``N`` as a number.  Each older snapshot is
   reported as an older snapshot.  A released name (rules 1 and 2) beats a snapshot because
   snapshots are what training leaves behind on the way to it.
4. **lone-deploy**: ``deploy.prototxt`` + the one caffemodel in its directory that rules 1 to 3 did
   not pair or report; the snapshots of one prefix count as one caffemodel, their newest (the
   older ones are reported).  Only the bare name ``deploy`` qualifies: ``yolo_deploy.prototxt``
   beside a lone ``tiny.caffemodel`` is two different names, not a pair.

Ambiguous, so left unpaired: two prototxts that match the same caffemodel by one rule (``a_deploy``
and ``a-deploy`` beside ``a.caffemodel``), one prototxt that matches several caffemodels equally
(two newest snapshots with the same ``N``; ``deploy.prototxt`` beside two unrelated caffemodels).

Names: the suffixes and the words ``deploy``, ``iter``, ``solver``, ``train``... match in any
case; the model's own part of a name (``X``, ``S``) must match exactly.  A *word* is a run of
letters and digits (``yolov3-tiny_train`` has the words ``yolov3``, ``tiny``, ``train``).

Not deploy nets:

- a prototxt with a word that begins with ``solver`` (``solver.prototxt``, ``lenet_solver_adam``:
  a solver, not a net), or with ``labelmap`` or ``label_map`` in its name (SSD's class list),
  never pairs;
- a prototxt with the word ``train``, ``trainval``, ``training`` or ``test`` and not ``deploy``
  (``train_val.prototxt``, ``yolo_train.prototxt``, ``yolov2-544_test.prototxt``) is a training
  or test net with data layers: it pairs only by rule 1, because ``X_test.prototxt`` +
  ``X_test.caffemodel`` is what a converter makes of a ``X_test.cfg``, but never by a zoo rule.

Every other ``.prototxt`` and ``.caffemodel`` left over is reported unpaired: ``Unpaired.reason``
says why in one sentence, ``Unpaired.kind`` which kind of reason it is:

============== ===============================================================================
not-a-net      a solver or a label map
training-net   named as a training or test net, and no same-name caffemodel beside it
no-partner     no file with a matching name (the reason names the file it looked for)
partner-taken  its match is paired with another file by a stronger rule, or left unpaired
ambiguous      a rule found two answers
older-snapshot a newer snapshot of the same prefix is the one paired
outside-tree   a symlink whose target is outside the tree: not followed
broken-symlink a symlink whose target is missing
not-regular    a FIFO, socket, device (or, given to ``pair_of``, a directory) with a model name
skipped        given to ``pair_of`` but never an input: a bnfix output, another file type
error          the OS refused to list or examine it (the reason carries the OS error)
============== ===============================================================================

Only ``error`` is a failure of discovery itself; the others describe the tree.

Walking a tree
--------------
- Order: depth first; a directory's results come out together, sorted by file name, before its
  subdirectories are visited, in name order.  Names sort by code point, so the order is the same
  everywhere.  ``walk`` is lazy: it holds the listing of the directory at hand and the names of
  the directories still to visit, never the tree's results, so its memory does not grow with
  the number of models.
- Skipped silently: directories named ``.git``, ``.hg``, ``.svn``; files and directories whose
  names end in ``.bnfix.prototxt``, ``.bnfix.caffemodel``, ``.bnfix-tmp``, ``.bnfix-old``,
  ``.bnfix-lock`` or ``.orig`` (bnfix's outputs, temporary files and backups); every
  directory in ``exclude``, matched by its real path and, if it existed when the walk began, by
  identity, so an output directory created during the walk is skipped too; every directory
  holding a ``.bnfix-output`` tag (``bnfix -o DIR`` writes one into DIR when DIR lies inside a
  tree it walks), so a tree patched into a directory inside itself is not picked up again by
  later runs.  The root itself is always
  walked (``bnfix OUT --check`` checks the outputs).  Other file types are ignored.
- Symlinked directories are never followed.  A target inside the tree is walked anyway, under
  its own path, so every directory is walked once, under the path that ``-o`` mirrors and
  ``--in-place`` writes; a target outside the tree is reported (``outside-tree``).  So no symlink
  can make the walk loop; besides, the ``(st_dev, st_ino)`` of every walked directory is kept, so
  a bind mount that repeats a directory (or an ancestor) is walked once.
- A symlinked file is used, under its own name, if its target is inside the tree (git-annex and
  DVC keep their objects in the repository as symlink targets).  A target outside the tree is
  not part of what was asked for, and ``--in-place`` would replace or write through the link, so
  it is reported (``outside-tree``) and left alone.  A broken symlink is reported
  (``broken-symlink``; in a git-annex checkout: content not fetched).
- A model-named FIFO, socket or device is reported (``not-regular``) and never opened: opening a
  FIFO blocks.
- A directory that cannot be listed, or a model file whose type cannot be read, is reported with
  the OS error (``error``) and the walk goes on.  Files are not opened here, so a file that
  cannot be read is paired by name and fails when bnfix opens it, as an explicit pair would.

One file
--------
``pair_of(path)`` and ``pairs_of(paths)`` apply the same rules to the listing of each file's
directory, for hooks that are given the changed files only, in any order (maybe just the
``.caffemodel`` of a pair).  Symlink targets count as inside when they lie under ``root``
(default: the file's own directory; a hook passes the repository root).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import NamedTuple

__all__ = ["CAFFEMODEL", "PROTOTXT", "Found", "Pair", "Rule", "Unpaired", "Why", "pair_names", "pair_of",
           "pairs_of", "walk"]

PROTOTXT, CAFFEMODEL = ".prototxt", ".caffemodel"
VCS_DIRS = frozenset({".git", ".hg", ".svn"})
OUTPUT_TAG = ".bnfix-output"  # in an ``-o DIR`` inside a walked tree: a tree of outputs, not inputs
BNFIX_SUFFIXES = (".bnfix.prototxt", ".bnfix.caffemodel", ".bnfix-tmp", ".bnfix-old", ".bnfix-lock",
                  ".orig")
TRAINING_WORDS = frozenset({"train", "trainval", "training", "test"})

_DEPLOY = re.compile(r"(.+)[_-]deploy", re.IGNORECASE)  # fullmatch: S_deploy, S-deploy
_SNAPSHOT = re.compile(r"(.+)_iter_([0-9]+)", re.IGNORECASE)  # fullmatch: Caffe's prefix_iter_N
_LABELMAP = re.compile(r"label_?map", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+")  # letters and digits, in any script


class Rule(str, Enum):
    """Which rule paired a prototxt with a caffemodel (the JSON value; see the module docstring)."""

    SAME_NAME = "same-name"
    DEPLOY_NAME = "deploy-name"
    SNAPSHOT = "snapshot"
    LONE_DEPLOY = "lone-deploy"

    def __str__(self) -> str:  # the value on every Python (3.12 changed format() of mixed enums)
        return str.__str__(self)


class Why(str, Enum):
    """Which kind of reason left a file unpaired; ``error`` is the only one that is a failure."""

    NOT_A_NET = "not-a-net"  # a solver or a label map
    TRAINING_NET = "training-net"  # train/test net by its name, and no same-name caffemodel
    NO_PARTNER = "no-partner"  # no file with a matching name
    PARTNER_TAKEN = "partner-taken"  # its match is paired (or reported) by a stronger rule
    AMBIGUOUS = "ambiguous"  # a rule found two answers
    OLDER_SNAPSHOT = "older-snapshot"  # a newer snapshot of the same prefix is the one paired
    OUTSIDE_TREE = "outside-tree"  # a symlink out of the tree, not followed
    BROKEN_SYMLINK = "broken-symlink"
    NOT_REGULAR = "not-regular"  # a FIFO, socket, device or directory with a model name
    SKIPPED = "skipped"  # given to pair_of but never an input: a bnfix output, another file type
    ERROR = "error"  # the OS refused to list or examine it

    def __str__(self) -> str:
        return str.__str__(self)


class Pair(NamedTuple):
    """A prototxt and the caffemodel that goes with it, found in one directory."""

    prototxt: Path
    caffemodel: Path
    rel: Path  # their directory relative to the walked root (Path('.') for the root): -o mirrors it
    rule: Rule


class Unpaired(NamedTuple):
    """A model file (or a directory) discovery left alone, and why."""

    path: Path
    reason: str  # one sentence, for the report
    kind: Why


Found = Pair | Unpaired


# ---------------------------------------------------------------------------------------------
# Names (pure)


def model_suffix(name: str) -> str | None:
    """``PROTOTXT`` or ``CAFFEMODEL`` if the name has that suffix in any case, else None."""
    lower = name.lower()
    for suffix in (PROTOTXT, CAFFEMODEL):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_bnfix_name(name: str) -> bool:
    """An output, temporary file or backup of bnfix's own, never an input."""
    return name.lower().endswith(BNFIX_SUFFIXES)


def _stem(name: str) -> str:
    return name[: -len(model_suffix(name) or "")]


def _snapshot(stem: str) -> tuple[str, int] | None:
    m = _SNAPSHOT.fullmatch(stem)
    return (m.group(1), int(m.group(2))) if m else None


def _deploy_base(stem: str) -> str | None:
    m = _DEPLOY.fullmatch(stem)
    return m.group(1) if m else None


def _role(stem: str) -> tuple[Why, str] | None:
    """Why a prototxt's name says it is not a deploy net (kind, the telling word), or None."""
    words = _WORD.findall(stem.lower())
    if any(w.startswith("solver") for w in words):
        return Why.NOT_A_NET, "solver"
    if _LABELMAP.search(stem):
        return Why.NOT_A_NET, "label map"
    if "deploy" not in words:
        for w in words:
            if w in TRAINING_WORDS:
                return Why.TRAINING_NET, w
    return None


def _few(names: list[str], limit: int = 3) -> str:
    """``a``, ``a and b``, ``a, b and c``, ``a, b, c and 4 more``: a list short enough for a line."""
    if len(names) > limit:
        return f"{', '.join(names[:limit])} and {len(names) - limit} more"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class _P(NamedTuple):
    prototxt: str
    caffemodel: str
    rule: Rule


class _U(NamedTuple):
    name: str
    kind: Why
    reason: str


class _Matcher:
    """The rules applied to one directory's model file names: a few dicts, one pass per rule."""

    def __init__(self, names: Iterable[str]) -> None:
        self.protos: list[str] = []
        self.models: list[str] = []
        for name in sorted(set(names)):
            suffix = None if is_bnfix_name(name) else model_suffix(name)
            if suffix == PROTOTXT:
                self.protos.append(name)
            elif suffix == CAFFEMODEL:
                self.models.append(name)
        self.by_stem: dict[str, list[str]] = {}
        self.series: dict[str, list[str]] = {}  # snapshot prefix -> its caffemodels
        for m in self.models:
            self.by_stem.setdefault(_stem(m), []).append(m)
            snap = _snapshot(_stem(m))
            if snap:
                self.series.setdefault(snap[0], []).append(m)
        self.paired: dict[str, _P] = {}  # both names of every pair
        self.left: dict[str, _U] = {}  # decided: reported with this reason
        self.notes: dict[str, _U] = {}  # a prototxt's reason if no later rule pairs it
        self.wanted: dict[str, list[tuple[str, Rule]]] = {}  # caffemodel -> who matched it by name

    def run(self) -> list[_P | _U]:
        for p in self.protos:
            role = _role(_stem(p))
            if role and role[0] is Why.NOT_A_NET:
                self.left[p] = _U(p, Why.NOT_A_NET, f"a {role[1]}, not a net")
        self._rule(Rule.SAME_NAME, {p: self.by_stem.get(_stem(p), []) for p in self.protos})
        deploys = {p: b for p in self.protos if (b := _deploy_base(_stem(p))) is not None}
        self._rule(Rule.DEPLOY_NAME, {p: self.by_stem.get(b, []) for p, b in deploys.items()})
        self._rule(Rule.SNAPSHOT, {p: sorted(self.series.get(b, []) + self.series.get(_stem(p), []))
                                   for p, b in deploys.items()})
        lone = [p for p in self.protos if _stem(p).lower() == "deploy"]
        self._rule(Rule.LONE_DEPLOY, dict.fromkeys(lone, self.models), by_name=False)
        out = [self.paired.get(p) or self.left.get(p) or self._why_prototxt(p) for p in self.protos]
        out += [self.left.get(c) or self._why_caffemodel(c) for c in self.models if c not in self.paired]
        return sorted(out, key=lambda r: r[0])

    def _done(self, name: str) -> bool:
        return name in self.paired or name in self.left

    def _rule(self, rule: Rule, wants: dict[str, list[str]], *, by_name: bool = True) -> None:
        """Apply one rule: ``wants`` maps each prototxt to the caffemodels its name matches."""
        if by_name:
            for p, cands in wants.items():
                for c in cands:
                    self.wanted.setdefault(c, []).append((p, rule))
        open_ = self._open(rule, wants)
        claimants: dict[str, list[str]] = {}
        for p, free in open_.items():
            for c in free:
                claimants.setdefault(c, []).append(p)
        for p, free in open_.items():
            rivals = sorted({q for c in free for q in claimants[c]} - {p})
            if rivals:
                self._rivals(rule, p, free, rivals, claimants)
            else:
                self._choose(rule, p, free)

    def _open(self, rule: Rule, wants: dict[str, list[str]]) -> dict[str, list[str]]:
        """The prototxts still unpaired, each with its matches still free (none: not listed)."""
        open_: dict[str, list[str]] = {}
        for p, cands in wants.items():
            if self._done(p):
                continue
            free = [c for c in cands if not self._done(c)]
            if free:
                open_[p] = free
            elif cands:
                self._note_taken(p, cands[0], rule)
        return open_

    def _rivals(self, rule: Rule, p: str, free: list[str], rivals: list[str],
                claimants: dict[str, list[str]]) -> None:
        verb = "matches" if len(rivals) == 1 else "match"
        self.left[p] = _U(p, Why.AMBIGUOUS,
                          f"ambiguous: {_few(rivals)} {verb} the same .caffemodel by the {rule.value} rule")
        for c in free:
            if len(claimants[c]) > 1:
                why = f"ambiguous: {_few(claimants[c])} match it by the {rule.value} rule"
            else:
                why = f"ambiguous: {p} matches it, but competes with {_few(rivals)} by the {rule.value} rule"
            self.left.setdefault(c, _U(c, Why.AMBIGUOUS, why))

    def _choose(self, rule: Rule, p: str, free: list[str]) -> None:
        best, older, tie = self._select(rule, free)
        if len(best) == 1:
            self.paired[p] = self.paired[best[0]] = _P(p, best[0], rule)
            for o in older:
                self.left[o] = _U(o, Why.OLDER_SNAPSHOT, f"an older snapshot: {best[0]} is the newest for {p}")
            return
        self.left[p] = _U(p, Why.AMBIGUOUS, f"ambiguous: {tie} ({_few(best)})")
        for c in best:
            self.left[c] = _U(c, Why.AMBIGUOUS,
                              f"ambiguous: one of {len(best)} .caffemodel files that {p} matches equally")
        for o in older:
            self.left[o] = _U(o, Why.OLDER_SNAPSHOT, f"an older snapshot for {p}, whose newest are ambiguous")

    @staticmethod
    def _select(rule: Rule, free: list[str]) -> tuple[list[str], list[str], str]:
        """The best candidates (one: the match; several: a tie), the older snapshots, and what
        the tie is, in words."""
        if len(free) == 1:
            return free, [], ""
        snaps = {c: _snapshot(_stem(c)) for c in free}
        prefixes = {snap[0] if snap else None for snap in snaps.values()}
        if rule is Rule.LONE_DEPLOY and (len(prefixes) > 1 or None in prefixes):
            return free, [], f"{len(free)} .caffemodel files beside it, none named for it"
        if rule is not Rule.SNAPSHOT and rule is not Rule.LONE_DEPLOY:
            return free, [], f"{len(free)} .caffemodel files match it by the {rule.value} rule"
        # snapshots of one prefix (lone-deploy: as one caffemodel): the newest
        iters = {c: snap[1] if snap else -1 for c, snap in snaps.items()}
        newest = max(iters.values())
        best = [c for c in free if iters[c] == newest]
        return best, [c for c in free if iters[c] != newest], f"{len(best)} snapshots of iteration {newest}"

    def _note_taken(self, p: str, c: str, rule: Rule) -> None:
        """Remember why ``p`` got nothing from this rule: its match is already paired or reported.
        (The lone-deploy rule names no file; ``_why_prototxt`` words that case.)"""
        if rule is Rule.LONE_DEPLOY:
            return
        if c in self.paired:
            how = f"paired with {self.paired[c].prototxt} by the {self.paired[c].rule.value} rule"
        else:
            how = f"itself unpaired ({self.left[c].kind.value})"
        self.notes.setdefault(p, _U(p, Why.PARTNER_TAKEN,
                                    f"{c} would match it by the {rule.value} rule, but is {how}"))

    def _why_prototxt(self, p: str) -> _U:
        stem = _stem(p)
        role = _role(stem)
        if role and role[0] is Why.TRAINING_NET:
            return _U(p, Why.TRAINING_NET,
                      f"named as a {role[1]} net, not a deploy net, and no {stem}.caffemodel is beside it")
        if p in self.notes:
            return self.notes[p]
        base = _deploy_base(stem)
        if base is not None:
            why = f"no {stem}.caffemodel, {base}.caffemodel or snapshot {base}_iter_N.caffemodel beside it"
        elif stem.lower() == "deploy":
            why = "no unpaired .caffemodel beside it" if self.models else "no .caffemodel beside it"
        else:
            why = f"no {stem}.caffemodel beside it"
        return _U(p, Why.NO_PARTNER, why)

    def _why_caffemodel(self, c: str) -> _U:
        wanted = self.wanted.get(c, [])
        if wanted:  # a name matched it: say what became of that prototxt (a pair first)
            p, rule = min(wanted, key=lambda w: w[0] not in self.paired)
            if p in self.paired:
                q = self.paired[p]
                how = f"paired with {q.caffemodel} by the {q.rule.value} rule"
            else:
                how = f"itself unpaired ({self.left[p].kind.value})"
            return _U(c, Why.PARTNER_TAKEN, f"{p} would match it by the {rule.value} rule, but is {how}")
        stem = _stem(c)
        snap = _snapshot(stem)
        if snap:
            deploy = snap[0] if _deploy_base(snap[0]) is not None else f"{snap[0]}_deploy"
            return _U(c, Why.NO_PARTNER, f"no {deploy}.prototxt beside this snapshot")
        return _U(c, Why.NO_PARTNER, f"no {stem}.prototxt or {stem}_deploy.prototxt beside it")


def pair_names(names: Iterable[str]) -> list[Found]:
    """The rules applied to the file names of one directory, with no I/O.

    Names without a model suffix, and bnfix's own outputs, are ignored; the results are sorted
    by name and their paths are the bare names (``rel`` is ``Path('.')``).
    """
    return [_to_found(r, Path(), Path()) for r in _Matcher(names).run()]


def _to_found(r: _P | _U, d: Path, rel: Path) -> Found:
    if isinstance(r, _P):
        return Pair(d / r.prototxt, d / r.caffemodel, rel, r.rule)
    return Unpaired(d / r.name, r.reason, r.kind)


# ---------------------------------------------------------------------------------------------
# The file system (the only I/O: scandir, stat, realpath; nothing is opened)


class _Is(Enum):
    MODEL = "model"  # a usable .prototxt/.caffemodel
    DIR = "dir"  # a real directory, to walk
    NOTHING = "nothing"  # not ours: ignored silently


def _cannot(what: str, exc: OSError) -> str:
    return f"cannot {what}: {exc.strerror or exc}"


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _type_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "an unusual file type"


def _not_regular(path: Path, mode: int) -> Unpaired:
    return Unpaired(path, f"not a regular file ({_type_name(mode)}); not opened", Why.NOT_REGULAR)


def _look(entry: os.DirEntry[str], d: Path, tree: str) -> _Is | Unpaired:
    """What one directory entry is to discovery.  Costs no system call for a plain file or
    directory on file systems that report the type in the listing; one ``stat`` per symlink."""
    name = entry.name
    if name in VCS_DIRS or is_bnfix_name(name):
        return _Is.NOTHING
    model = model_suffix(name) is not None
    try:
        if entry.is_symlink():
            return _look_link(entry.path, d / name, model, tree)
        if entry.is_dir(follow_symlinks=False):
            return _Is.DIR
        if not model:
            return _Is.NOTHING
        if entry.is_file(follow_symlinks=False):
            return _Is.MODEL
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        return Unpaired(d / name, _cannot("examine it", exc), Why.ERROR) if model else _Is.NOTHING
    return _not_regular(d / name, mode)


def _look_link(path: str, shown: Path, model: bool, tree: str) -> _Is | Unpaired:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not model:
            return _Is.NOTHING
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return Unpaired(shown, f"a broken symlink (to {target})", Why.BROKEN_SYMLINK)
    except OSError as exc:
        return Unpaired(shown, _cannot("follow this symlink", exc), Why.ERROR) if model else _Is.NOTHING
    target = os.path.realpath(path)
    if not (model or stat.S_ISDIR(mode)):
        return _Is.NOTHING
    if not _within(target, tree):
        what = "directory" if stat.S_ISDIR(mode) else "file"
        return Unpaired(shown, f"a symlink to a {what} outside the tree ({target}); not followed", Why.OUTSIDE_TREE)
    if stat.S_ISDIR(mode):
        return _Is.NOTHING  # walked under its own path
    return _Is.MODEL if stat.S_ISREG(mode) else _not_regular(shown, mode)


class _Listing(NamedTuple):
    names: list[str]  # the usable model files, for the rules
    found: list[Unpaired]  # entries reported as they are
    dirs: list[os.DirEntry[str]]  # real subdirectories


def _read_dir(d: Path, tree: str) -> _Listing:
    """One directory, in name order (``os.scandir``'s ``OSError`` propagates)."""
    with os.scandir(d) as it:
        entries = sorted(it, key=lambda e: e.name)
    listing = _Listing([], [], [])
    for entry in entries:
        what = _look(entry, d, tree)
        if isinstance(what, Unpaired):
            listing.found.append(what)
        elif what is _Is.MODEL:
            listing.names.append(entry.name)
        elif what is _Is.DIR:
            listing.dirs.append(entry)
    return listing


class _Skip:
    """The ``exclude`` directories: by real path (also for those created later) and by identity."""

    def __init__(self, exclude: Iterable[Path]) -> None:
        self.paths: set[str] = set()
        self.keys: set[tuple[int, int]] = set()
        for p in exclude:
            self.paths.add(os.path.realpath(p))
            try:
                st = os.stat(p)
            except OSError:
                continue
            self.keys.add((st.st_dev, st.st_ino))

    def __contains__(self, where: tuple[str, tuple[int, int]]) -> bool:
        return where[0] in self.paths or where[1] in self.keys


def walk(root: Path, *, exclude: Iterable[Path] = ()) -> Iterator[Found]:
    """Every pair under ``root``, and every model file left unpaired, lazily, in a fixed order.

    Nothing happens before the first ``next()``.  Paths are ``root`` joined with the names found
    (as the caller spelled ``root``, not resolved).  A missing or non-directory ``root`` yields
    one ``Unpaired`` of kind ``error``.
    """
    root = Path(root)
    try:
        st = os.stat(root)
    except OSError as exc:
        yield Unpaired(root, _cannot("examine it", exc), Why.ERROR)
        return
    if not stat.S_ISDIR(st.st_mode):
        yield Unpaired(root, "not a directory", Why.ERROR)
        return
    tree = os.path.realpath(root)
    skip = _Skip(exclude)
    seen = {(st.st_dev, st.st_ino)}
    stack: list[tuple[Path, str, Path]] = [(root, tree, Path())]
    while stack:
        d, real, rel = stack.pop()
        try:
            listing = _read_dir(d, tree)
        except OSError as exc:
            yield Unpaired(d, _cannot("list this directory", exc), Why.ERROR)
            continue
        found: list[Found] = [*listing.found]
        subdirs: list[tuple[Path, str, Path]] = []
        for entry in listing.dirs:
            sub = _subdir(entry, d, real, skip, seen)
            if isinstance(sub, Unpaired):
                found.append(sub)
            elif sub is not None:
                subdirs.append((d / entry.name, sub, rel / entry.name))
        found += (_to_found(r, d, rel) for r in _Matcher(listing.names).run())
        del listing
        found.sort(key=lambda r: r[0].name)
        yield from found
        stack.extend(reversed(subdirs))


def _subdir(entry: os.DirEntry[str], d: Path, real: str, skip: _Skip,
            seen: set[tuple[int, int]]) -> str | Unpaired | None:
    """The real path of a subdirectory to walk, or None to skip it (excluded or seen already)."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError as exc:
        return Unpaired(d / entry.name, _cannot("examine this directory", exc), Why.ERROR)
    sub, key = os.path.join(real, entry.name), (st.st_dev, st.st_ino)
    if (sub, key) in skip or key in seen or os.path.lexists(os.path.join(d, entry.name, OUTPUT_TAG)):
        return None
    seen.add(key)
    return sub


def pair_of(path: Path, *, root: Path | None = None) -> Found:
    """The pair ``path`` (a .prototxt or a .caffemodel) belongs to, or why it has none."""
    return next(pairs_of([path], root=root))


def pairs_of(paths: Iterable[Path], *, root: Path | None = None) -> Iterator[Found]:
    """``pair_of`` for many files: each directory is listed once, and each pair comes out once
    even when both of its files are given.  One result per given file otherwise, in order of
    directory (real path), then name.  ``rel`` is relative to ``root`` (default: ``Path('.')``)."""
    groups: dict[str, tuple[Path, dict[str, Path]]] = {}  # by the directory's real path
    real_of: dict[Path, str] = {}
    for p in paths:
        p = p if isinstance(p, Path) else Path(p)
        parent = p.parent
        real = real_of.get(parent)
        if real is None:
            real = real_of[parent] = os.path.realpath(parent)
        groups.setdefault(real, (parent, {}))[1].setdefault(p.name, p)
    tree_root = None if root is None else os.path.realpath(root)
    for real in sorted(groups):
        d, given = groups[real]
        yield from _pairs_in(d, real, given, tree_root)


def _pairs_in(d: Path, real: str, given: dict[str, Path], tree_root: str | None) -> list[Found]:
    """The results for the files ``given`` (name -> the caller's path) of directory ``d``."""
    tree = real if tree_root is None else tree_root
    if not _within(real, tree):
        return [Unpaired(given[n], f"outside the tree {tree}", Why.OUTSIDE_TREE) for n in sorted(given)]
    try:
        listing = _read_dir(d, tree)
    except OSError as exc:
        return [Unpaired(given[n], _cannot("list its directory", exc), Why.ERROR) for n in sorted(given)]
    rel = Path(os.path.relpath(real, tree))
    out: dict[str, Found] = {u.path.name: u for u in listing.found if u.path.name in given}
    for r in _Matcher(listing.names).run():
        hit = [n for n in ((r.prototxt, r.caffemodel) if isinstance(r, _P) else (r.name,)) if n in given]
        if hit:
            result = _to_found(r, d, rel)
            out.update(dict.fromkeys(hit, result))
    for name in given.keys() - out.keys():
        out[name] = _not_found(d / name)
    return list({id(r): r for r in (out[n] for n in sorted(out))}.values())  # a pair given twice: once


def _not_found(path: Path) -> Unpaired:
    """Why a given file took no part in pairing although it was not reported by ``_look``."""
    if not os.path.lexists(path):
        return Unpaired(path, f"cannot examine it: {os.strerror(errno.ENOENT)}", Why.ERROR)
    if is_bnfix_name(path.name):
        return Unpaired(path, "a bnfix output, temporary file or backup, never an input", Why.SKIPPED)
    if model_suffix(path.name) is None:
        return Unpaired(path, "not a .prototxt or .caffemodel file", Why.SKIPPED)
    return Unpaired(path, "not a regular file (a directory); not opened", Why.NOT_REGULAR)
