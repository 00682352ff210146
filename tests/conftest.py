"""Shared fixtures: where the data lives, and synthetic caffemodels for prototxt-only files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import caffe_proto as cp
import numpy as np
import pytest

from bnfix import prototxt

# A test run started with SIGINT ignored (a background job of a non-interactive shell, nohup)
# passes that to every child, and bnfix rightly leaves an ignored signal ignored: the Ctrl-C
# tests would then test the environment.  Give this process and its children Python's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS = Path(__file__).parent
REPO = TESTS.parent
DATA = TESTS / "data"
SAMPLE = REPO / "samples"
NANO = DATA / "mobilenetv2-yolov3-nano-voc"
SHARED = Path(os.environ.get("BNFIX_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpus"


def shared_corpus(sub: str) -> Path:
    """The ../shared corpus folder, or skip (but never under CI, where it is always present)."""
    path = CORPUS / sub
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing under CI")
        pytest.skip(f"{path} not present (a plain clone has no ../shared; CI always has it)")
    return path


def synth_model_for(text: str, seed: int = 0) -> bytes:
    """A caffemodel matching a prototxt: random BN statistics per BatchNorm name, one conv per
    other named layer, plus an unknown field (149) on one of them, like a fork's param."""
    rng = np.random.default_rng(seed)
    doc = prototxt.parse(text)
    layers, seen = [], set()
    for layer in doc.layers():
        if not layer.name or layer.name in seen:
            continue
        seen.add(layer.name)
        if layer.type == "BatchNorm":
            c = 6
            var = rng.uniform(1e-3, 2.0, c)
            var[0] = 3e-7  # a near-zero channel, as in real YOLO models
            layers.append(cp.bn_layer(layer.name, rng.normal(size=c), var,
                                      param={"use_global_stats": True}))
        else:
            conv = cp.conv_layer(layer.name, rng.normal(size=5))
            conv.type = layer.type
            layers.append(conv)
    return cp.model_bytes(*layers)


@pytest.fixture
def pair(tmp_path):
    """Write a prototxt text and its synthetic caffemodel into tmp_path; return the two paths."""

    def make(text: str, model: bytes | None = None, name: str = "m") -> tuple[Path, Path]:
        pp, mp = tmp_path / f"{name}.prototxt", tmp_path / f"{name}.caffemodel"
        pp.write_bytes(text.encode())
        mp.write_bytes(synth_model_for(text) if model is None else model)
        return pp, mp

    return make


def run_in_pty(args: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None,
               timeout: float = 120) -> tuple[int, str]:
    """``python -m bnfix ARGS`` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "bnfix", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the child has closed the terminal (Linux)
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")
