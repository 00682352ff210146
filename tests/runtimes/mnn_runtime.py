"""MNN as a runtime for the tests: ``mnnconvert -f CAFFE``, then MNN's Session API on the CPU.

pip ``mnn`` (3.6.1) depends on numpy alone and works beside numpy 2 and protobuf 7, so it is a
test extra of the main venv; the work happens in mnn_child.py, a child process of the same
python (why: see there). MNN maps the custom Caffe ``Upsample`` to a ``Resize`` that is not
nearest (2.6 off at the nano model's second head): pass a copy from ``upsample.py``.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import child_io, venvs
from .upsample import tensor_name

CHILD = Path(__file__).with_name("mnn_child.py")
INSTALL = "pip install 'mnn==3.6.1' (the test extra)"


def missing_reason() -> str | None:
    for module in ("MNN", "_tools"):
        if importlib.util.find_spec(module) is None:
            return f"MNN missing (no module {module}): {INSTALL}"
    return None


def run_caffe(prototxt: Path, caffemodel: Path, x: np.ndarray, outputs: Sequence[str],
              workdir: Path) -> list[np.ndarray]:
    """Convert with mnnconvert (BN folded into convolutions in float32), run one forward pass
    with precision "high"; return the final value of each blob in `outputs`."""
    text = Path(prototxt).read_text()
    names = [tensor_name(text, o) for o in outputs]
    req = child_io.write_request(workdir, prototxt, caffemodel, x, names)
    res = subprocess.run([sys.executable, str(CHILD), str(req)], check=False, capture_output=True, text=True,
                         timeout=600, env=venvs.child_env(()))
    if res.returncode != 0:
        raise RuntimeError(f"mnn_child.py exited {res.returncode}:\n{res.stderr[-4000:]}")
    arrays, _info = child_io.read_result(workdir, len(names))
    return arrays
