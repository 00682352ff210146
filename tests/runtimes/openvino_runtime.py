"""OpenVINO 2023.3 as a runtime for the tests: Model Optimizer's Caffe front end, CPU plugin.

MO needs protobuf 3.20.x and numpy < 1.26, so it lives in a venv of its own (venvs.py), built
on first use in ~16 s from a clean pip cache. Only what MO's Caffe path imports is installed:
``openvino-dev[caffe]``'s declared dependencies also pull opencv-python, scipy, pillow, tqdm,
requests and openvino-telemetry (for its accuracy checker and POT, unused here), so openvino and
openvino-dev go in with ``--no-deps`` beside the five packages MO imports. There are no Python
3.12+ wheels of 2023.3: on a newer interpreter the build fails and the test says so.

OpenVINO does not know the custom Caffe ``Upsample``: pass a copy from ``upsample.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import venvs
from .upsample import tensor_name

SPEC = venvs.VenvSpec(
    name="openvino-2023.3",
    requirements=("numpy==1.25.2", "protobuf==3.20.3", "networkx==3.1", "defusedxml==0.7.1",
                  "fastjsonschema==2.17.1"),
    no_deps=("openvino==2023.3.0", "openvino-dev==2023.3.0"),
)
CHILD = Path(__file__).with_name("openvino_child.py")


def missing_reason() -> str | None:
    return venvs.missing_reason(SPEC)


def run_caffe(prototxt: Path, caffemodel: Path, x: np.ndarray, outputs: Sequence[str],
              workdir: Path) -> list[np.ndarray]:
    """Convert with MO (BN folded into the convolutions in float32) and run one float32
    forward pass; return the final value of each blob in `outputs`."""
    text = Path(prototxt).read_text()
    names = [tensor_name(text, o) for o in outputs]
    return venvs.run_request(SPEC, CHILD, prototxt, caffemodel, x, names, workdir)
