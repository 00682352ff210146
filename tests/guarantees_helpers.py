"""Helpers for ``test_guarantees.py`` (the CLI-level tests of issue 8): model builders, tree
snapshots, leftover detection, child processes, and an opt-in test hook for real ``python -m
bnfix`` processes.

The hook: a child started with :meth:`HookPipe.env` gets a ``sitecustomize.py`` on its path
that calls :func:`install_hook`, which reads ``BNFIX_TEST_HOOK`` and wraps one bnfix function
so that the test acts at an exact moment: the child reports the event (``renamed 1`` between
the two renames, ``copying`` mid-copy, ``reporting`` after the save) on one pipe and waits on
another until the test lets it go, so nothing depends on timing.  Without the variable nothing
is installed, and the sitecustomize file exists only in a test's temp directory, never in the
tests folder (the commit tests' children would load it too).
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from faults import signal_me
from wire import fields, read_varint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMPLE_P = REPO / "samples" / "yoloface-50k.prototxt"
SAMPLE_M = REPO / "samples" / "yoloface-50k.caffemodel"

# The names of bnfix's own files: temps and rollback links (commit.py), locks (lock.py).
LEFTOVER = re.compile(r"\..+\.[0-9a-f]{12}\.bnfix-(tmp|old)|\..+\.bnfix-lock")


# -- models ----------------------------------------------------------------------------------


# (caffe_proto and numpy are imported where used: a hooked child imports this module at start-up.)


def tiny_prototxt() -> str:
    import caffe_proto as cp

    return cp.bn_prototxt(["bn1", "bn2"])


def tiny_model(extra_blobs: tuple = ()) -> bytes:
    """conv + two BatchNorm layers, as a Darknet converter writes them (eps 1e-5 default);
    ``extra_blobs`` are appended to bn2's blobs (a layout bnfix does not know)."""
    import caffe_proto as cp
    import numpy as np

    return cp.model_bytes(
        cp.conv_layer("conv", np.ones(4)),
        cp.bn_layer("bn1", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
        cp.bn_layer("bn2", [0.0, -0.5, 0.25], [0.5, 3e-7, 2.0], extra_blobs=extra_blobs),
    )


def write_tiny(d: Path, name: str = "m") -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    p, m = d / f"{name}.prototxt", d / f"{name}.caffemodel"
    p.write_text(tiny_prototxt())
    m.write_bytes(tiny_model())
    return p, m


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def huge_caffemodel(src: bytes, layer: str, filters: int) -> bytes:
    """``src`` with the first weights blob of Convolution ``layer`` grown to ``filters`` output
    channels (its other dimensions kept), built at the wire level: the original weights first,
    then copies of them.  Everything else keeps its bytes."""
    import caffe_proto as cp
    import numpy as np

    out, found = [], False
    for number, _, start, end in fields(src):
        field = src[start:end]
        if number == 100 and not found:
            body_at = start + len(_varint(100 << 3 | 2))
            n, body_at = read_varint(src, body_at)
            body = src[body_at:body_at + n]
            parsed = cp.LayerParameter()
            parsed.ParseFromString(body)
            if parsed.name == layer:
                found = True
                weights = parsed.blobs[0]
                dims = list(weights.shape.dim)
                per = int(np.prod(dims[1:]))
                old = np.asarray(weights.data, "<f4")
                data = np.resize(old, filters * per).astype("<f4").tobytes()
                shape = _len_field(1, b"".join(_varint(d) for d in [filters, *dims[1:]]))
                blob = _len_field(7, shape) + _len_field(5, data)
                parts, first = [], True
                for lnum, _, ls, le in fields(body):
                    if lnum == 7 and first:
                        parts.append(_len_field(7, blob))
                        first = False
                    else:
                        parts.append(body[ls:le])
                field = _len_field(100, b"".join(parts))
        out.append(field)
    if not found:
        raise ValueError(f"no layer {layer!r}")
    return b"".join(out)


# -- the file tree ---------------------------------------------------------------------------


def digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``root`` (hidden ones too): relative path -> (sha1 of the bytes, or
    "<dir>" or "-> target" for a symlink, and the permission bits)."""
    found = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                what = "<dir>"
            else:
                what = digest(path)
            found[str(path.relative_to(root))] = (what, stat.S_IMODE(st.st_mode))
    return found


def inodes(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: relative path -> (inode, size, permission bits), cheap for
    large files.  bnfix never writes into an existing file (it renames new ones over), so an
    unchanged inode and size mean unchanged bytes; the tests check the pristine files' digests
    at the end as well."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = "link " + os.readlink(path) if stat.S_ISLNK(st.st_mode) else stat.S_IFMT(st.st_mode)
            found[str(path.relative_to(root))] = (kind, st.st_ino, st.st_size, stat.S_IMODE(st.st_mode))
    return found


def temps(directory: Path) -> list[str]:
    """bnfix temp files in ``directory`` (none if it does not exist)."""
    try:
        return [n for n in os.listdir(directory) if n.endswith(".bnfix-tmp")]
    except FileNotFoundError:
        return []


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux /proc), e.g. a lock file it waits on."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return False
    for entry in entries:
        try:
            if os.readlink(fd_dir / entry) == str(path):
                return True
        except OSError:
            continue
    return False


def leftovers(root: Path) -> list[str]:
    """bnfix's temp, rollback and lock files anywhere under ``root``."""
    return sorted(str(Path(d, n).relative_to(root)) for d, _, names in os.walk(root)
                  for n in names if LEFTOVER.fullmatch(n))


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` holding hard links to every file of ``src`` (bnfix replaces files by renames,
    never writes into one, so the pristine copies stay pristine; the tests check that too)."""
    dst.mkdir(parents=True)
    for entry in os.scandir(src):
        os.link(entry.path, dst / entry.name)


# -- child processes -------------------------------------------------------------------------


_SITECUSTOMIZE = "import guarantees_helpers\nguarantees_helpers.install_hook()\n"


def child_env(hook_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for ``python -m bnfix``: this checkout first, the tests folder (for the
    hook), and with ``hook_dir`` a sitecustomize that installs the hook."""
    paths = [str(REPO), str(TESTS)]
    if hook_dir is not None:
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        paths.insert(0, str(hook_dir))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFIX_")}
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **extra)
    for var in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES"):
        env.pop(var, None)
    return env


def bnfix(args: list[str], cwd: Path, env: dict[str, str] | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """Start ``python -m bnfix ARGS`` in ``cwd`` (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "bnfix", *args], cwd=cwd, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)


def wait_for(predicate, timeout: float = 60.0, poll: float = 0.0005) -> bool:
    """Poll until ``predicate()`` is true; False after ``timeout`` seconds (generous: the
    machine is noisy; no test asserts on how long anything took)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


class HookPipe:
    """The two pipes of a hooked child: it reports events on one and, where the hook pauses,
    waits on the other until the test says ``go`` (no sleeps: the test acts while the child
    is surely at that point)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.go_r, self.go_w = os.pipe()
        self.buffer = b""
        self.fds = (self.w, self.go_r)  # for Popen's pass_fds

    def env(self, hook: str, hook_dir: Path, **extra: str) -> dict[str, str]:
        return child_env(hook_dir, BNFIX_TEST_HOOK=hook, BNFIX_TEST_HOOK_FD=str(self.w),
                         BNFIX_TEST_HOOK_GO_FD=str(self.go_r), **extra)

    def started(self) -> None:
        """Call once the child runs: the parent's copies of the child's ends must go."""
        os.close(self.w)
        os.close(self.go_r)

    def line(self, timeout: float = 60.0) -> str:
        """The next event line ('' at EOF: the child ended without reaching the event)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no event from the hooked bnfix")
            chunk = os.read(self.r, 4096)
            if not chunk:
                return ""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def go(self) -> None:
        """Let a paused child go on."""
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1

    def close(self) -> None:
        self.go()
        os.close(self.r)


# -- the hook (runs inside the child) --------------------------------------------------------


def install_hook() -> None:
    """In a child: act as ``BNFIX_TEST_HOOK`` says, one or more hooks separated by commas (see
    the module doc).  "Pause" means: report the event, then wait until the test closes the go
    pipe (or a signal interrupts the wait).

    - ``pause-after-rename``: pause after the first rename of a temp file onto its target.
    - ``pause-in-copy``: pause after the first chunk of the caffemodel copy
      (``bnfix.copier.copy_range``): the save is surely under way.
    - ``pause-in-report``: pause when ``bnfix.report.table`` is called (the summary the CLI
      prints after a pair is saved).
    - ``sigint-on-import:MODULE`` (or ``MODULE@FILE``): a Ctrl-C arrives while Python
      imports MODULE (only where code in a file whose path ends with FILE imports it).
    - ``sigint-in-del:MODULE``: the same, but the Ctrl-C lands in a ``__del__`` (as it can in
      any weakref callback), where Python cannot raise it: it prints "Exception ignored" and
      drops it, unless bnfix keeps it.
    - ``sigint-in:MODULE.FUNCTION``, ``sigint-after:MODULE.FUNCTION``: a Ctrl-C at the start
      of each call of FUNCTION (e.g. cleanup code, while the first signal is handled), or as
      its first call returns.
    - ``sigint-at-exit``: a Ctrl-C while Python shuts down (as it clears the modules).
    - ``sigint-in-set-name:MODULE``: a Ctrl-C arrives inside the first
      ``functools.cached_property.__set_name__`` of a class MODULE defines (Python 3.10 and
      3.11 hand it on wrapped in a RuntimeError).
    """
    specs = os.environ.get("BNFIX_TEST_HOOK")
    if not specs:
        return
    fd, go_fd = int(os.environ["BNFIX_TEST_HOOK_FD"]), int(os.environ["BNFIX_TEST_HOOK_GO_FD"])
    for spec in specs.split(","):
        _install_one(spec, fd, go_fd)


def _install_one(spec: str, fd: int, go_fd: int) -> None:
    kind, _, arg = spec.partition(":")

    def say(text: str) -> None:
        os.write(fd, f"{text}\n".encode())

    def pause(event: str) -> None:
        say(event)
        os.read(go_fd, 1)

    if kind == "pause-after-rename":
        from bnfix import commit

        commit.os = _PauseAfterRename(pause)  # type: ignore[assignment]
    elif kind == "pause-in-copy":
        from bnfix import copier

        real_copy = copier.copy_range
        first = [True]

        def copy_then_pause(*args, **kwargs):
            n = real_copy(*args, **kwargs)
            if first[0]:
                first[0] = False
                pause("copying")
            return n

        copier.copy_range = copy_then_pause  # type: ignore[assignment]
    elif kind == "pause-in-report":
        from bnfix import report

        real_table = report.table

        def pause_then_table(*args, **kwargs):
            pause("reporting")
            return real_table(*args, **kwargs)

        report.table = pause_then_table  # type: ignore[assignment]
    elif kind == "sigint-on-import":
        name, _, importer = arg.partition("@")
        sys.meta_path.insert(0, _InterruptImport(name, importer, say))
    elif kind == "sigint-in-del":
        sys.meta_path.insert(0, _InterruptImport(arg, "", say, in_del=True))
    elif kind in ("sigint-in", "sigint-after"):
        import importlib

        module_name, _, function = arg.rpartition(".")
        module = importlib.import_module(module_name)
        real = getattr(module, function)

        def wrapped(*args, **kwargs):
            if kind == "sigint-in":
                say(f"in {function}")
                _sigint_and_wait(0.5)  # no KeyboardInterrupt ends it if bnfix ignores the signal
                return real(*args, **kwargs)
            setattr(module, function, real)
            result = real(*args, **kwargs)
            say(f"after {function}")
            _sigint_and_wait(0.5)
            return result

        setattr(module, function, wrapped)
    elif kind == "sigint-at-exit":
        global _AT_EXIT
        _AT_EXIT = _SignalAtTeardown(fd)
    elif kind == "sigint-in-set-name":
        import functools

        real_set_name = functools.cached_property.__set_name__

        def set_name_then_sigint(self, owner, name):
            real_set_name(self, owner, name)
            if owner.__module__ == arg:
                functools.cached_property.__set_name__ = real_set_name  # type: ignore[method-assign]
                say(f"creating {owner.__name__}")
                _sigint_and_wait()

        functools.cached_property.__set_name__ = set_name_then_sigint  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown BNFIX_TEST_HOOK {spec!r}")


class _InterruptImport:
    """A meta path finder that sends SIGINT to its own process when ``name`` is imported (by
    code in a file ending with ``importer``, if given); it finds nothing itself: the import
    goes on, until the KeyboardInterrupt lands."""

    def __init__(self, name: str, importer: str, say, *, in_del: bool = False) -> None:
        self.name, self.importer, self.say, self.in_del = name, importer, say, in_del

    def _imported_from_importer(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.endswith(self.importer):
                return True
            frame = frame.f_back
        return False

    def find_spec(self, name, path=None, target=None):
        if name == self.name and (not self.importer or self._imported_from_importer()):
            sys.meta_path.remove(self)
            self.say(f"importing {name}")
            if self.in_del:
                _SignalInDel()  # dropped at once: its __del__ runs here
            else:
                _sigint_and_wait()
        return None


def _sigint_and_wait(seconds: float = 5.0) -> None:
    signal_me(signal.SIGINT)
    time.sleep(seconds)  # a KeyboardInterrupt ends this at once


_AT_EXIT: object = None


class _SignalAtTeardown:
    """Sends SIGINT from its ``__del__``, which runs when Python clears the modules on its way
    out: after it has reset its signal handlers to the defaults.  It keeps what it calls, as
    the modules are going."""

    def __init__(self, fd: int) -> None:
        import threading

        self.fd, self.write, self.kill, self.sleep = fd, os.write, signal.pthread_kill, time.sleep
        self.thread, self.signum = threading.get_ident(), signal.SIGINT

    def __del__(self) -> None:
        self.write(self.fd, b"exiting\n")
        self.kill(self.thread, self.signum)
        self.sleep(0.5)


class _SignalInDel:
    def __del__(self) -> None:
        _sigint_and_wait()


class _PauseAfterRename:
    """Stands in for ``bnfix.commit.os`` (like ``faults_driver.SlowRenames``, but for the CLI's
    own final paths, whatever they are): pauses after the first rename of a temp file onto its
    target (not onto a ``.orig`` backup)."""

    def __init__(self, pause) -> None:
        self.pause, self.count = pause, 0

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name != "replace":
            return real

        def replace(src, dst):
            real(src, dst)
            if str(src).endswith(".bnfix-tmp") and not str(dst).endswith(".orig"):
                self.count += 1
                if self.count == 1:
                    self.pause("renamed 1")

        return replace


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
