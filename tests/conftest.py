"""Shared fixtures: where the data lives, and synthetic caffemodels for prototxt-only files."""

from __future__ import annotations

import os
import signal
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
