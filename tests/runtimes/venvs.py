"""Private virtual environments for runtimes whose pins clash with the project's own.

OpenVINO's Model Optimizer needs protobuf 3.20.x and numpy < 2; caffe2onnx needs numpy 1.x and an
old-style generated ``_pb2``. Neither can share the test venv (numpy 2, protobuf 7), so each gets
a venv of its own, made by the test setup on first use and reused while its pins are unchanged:

    <cache>/<name>/             the venv
    <cache>/<name>/bnfix-venv.json   what it was built from (written last: a venv without it,
                                     or with other contents, is rebuilt from scratch)
    <cache>/<name>.lock         flock, so two pytest runs never build the same venv at once

``<cache>`` is ``$BNFIX_RUNTIME_VENVS`` or ``<repo>/.venv-runtimes``. A child script in that venv
does the runtime's work; data goes in and out as .npy files, never through the parent's imports.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[2]
CACHE_ENV = "BNFIX_RUNTIME_VENVS"
STAMP = "bnfix-venv.json"
PIP_TIMEOUT = 1200  # seconds for one pip install; a clean build takes ~10-20 s here


class VenvSpec(NamedTuple):
    """What goes into one venv. ``no_deps`` is installed after ``requirements`` with
    ``--no-deps``: for packages whose declared dependencies are wrong or too heavy."""
    name: str
    requirements: tuple[str, ...]
    no_deps: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()   # extra environment for the child process


class VenvError(RuntimeError):
    """The venv could not be built (no network, no wheel for this Python, ...)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO / ".venv-runtimes")


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _stamp(spec: VenvSpec) -> dict[str, object]:
    return {"python": sys.version, "requirements": list(spec.requirements),
            "no_deps": list(spec.no_deps)}


def _current(venv: Path, spec: VenvSpec) -> bool:
    try:
        return json.loads((venv / STAMP).read_text()) == _stamp(spec) and _python(venv).exists()
    except (OSError, ValueError):
        return False


def _pip(python: Path, args: Sequence[str], log: list[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "-q", *args]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT,
                             env=child_env(()))
    except subprocess.TimeoutExpired as e:
        raise VenvError(f"{' '.join(cmd)}: no answer within {PIP_TIMEOUT} s") from e
    log.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        raise VenvError(f"pip install {' '.join(args)} failed: " + " | ".join(lines[-4:]))


def ensure(spec: VenvSpec) -> Path:
    """The python of the venv for `spec`, building it first if it is missing or stale.

    Raises VenvError if it cannot be built; a half-built venv is removed."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / spec.name
    with open(root / f"{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(venv, spec):
            return _python(venv)
        shutil.rmtree(venv, ignore_errors=True)
        log: list[str] = []
        started = time.monotonic()
        try:
            res = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                                 check=False, capture_output=True, text=True)
            if res.returncode != 0:
                raise VenvError(f"python -m venv {venv} failed: {res.stderr.strip()[-500:]}")
            if spec.requirements:
                _pip(_python(venv), spec.requirements, log)
            if spec.no_deps:
                _pip(_python(venv), ["--no-deps", *spec.no_deps], log)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        (venv / "bnfix-venv.log").write_text("\n".join(log))
        (venv / STAMP).write_text(json.dumps(_stamp(spec), indent=1) + "\n")
        print(f"\n[venvs] built {venv} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return _python(venv)


def missing_reason(spec: VenvSpec) -> str | None:
    """None if the venv exists or could be built now, else why not (building it if needed)."""
    try:
        ensure(spec)
    except (VenvError, OSError) as e:
        return f"cannot build the {spec.name!r} venv in {cache_root()}: {e}"
    return None


def child_env(extra: Sequence[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    """The environment for a process in a private venv: ours, minus anything that would make
    it import from the test venv, plus the spec's own settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(dict(extra))
    return env


def run_request(spec: VenvSpec, script: Path, prototxt: Path, caffemodel: Path, x: np.ndarray,
                names: Sequence[str], workdir: Path) -> list[np.ndarray]:
    """One forward pass by ``script`` in ``spec``'s venv, through child_io's request and result
    files; the final value of each tensor in ``names``."""
    from . import child_io

    req = child_io.write_request(workdir, prototxt, caffemodel, x, names)
    run_child(spec, script, [req])
    arrays, _info = child_io.read_result(workdir, len(names))
    return arrays


def run_child(spec: VenvSpec, script: Path, args: Sequence[str | Path], timeout: float = 600) -> str:
    """Run `script` with the venv's python; return its stdout, or raise with its stderr."""
    python = ensure(spec)
    cmd = [str(python), str(script), *map(str, args)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                         env=child_env(spec.env))
    if res.returncode != 0:
        raise RuntimeError(f"{script.name} in the {spec.name!r} venv exited {res.returncode}:\n"
                           f"{res.stderr[-4000:]}")
    return res.stdout
