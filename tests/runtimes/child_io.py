"""The file protocol between a runtime module (test venv) and its child script (any venv).

The parent writes ``request.json`` and ``input.npy`` into a work directory and runs
``<venv python> <child>.py <workdir>/request.json``; the child writes one ``output_<i>.npy`` per
requested tensor and ``result.json`` (what ran: versions, notes). Only numpy and the standard
library, so it imports under numpy 1.23 .. 2.x alike.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class Request(NamedTuple):
    prototxt: str
    caffemodel: str
    outputs: list[str]   # runtime tensor names, in the order the caller wants them
    workdir: str

    @property
    def input(self) -> np.ndarray:
        return np.load(Path(self.workdir) / "input.npy")


def write_request(workdir: Path, prototxt: Path, caffemodel: Path, x: np.ndarray,
                  outputs: Sequence[str]) -> Path:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "input.npy", np.ascontiguousarray(x, dtype=np.float32))
    req = Request(str(Path(prototxt).resolve()), str(Path(caffemodel).resolve()), list(outputs),
                  str(workdir.resolve()))
    path = workdir / "request.json"
    path.write_text(json.dumps(req._asdict(), indent=1))
    return path


def read_request(argv: Sequence[str] = sys.argv) -> Request:
    return Request(**json.loads(Path(argv[1]).read_text()))


def write_result(req: Request, arrays: Sequence[np.ndarray], info: dict[str, Any]) -> None:
    if len(arrays) != len(req.outputs):
        raise RuntimeError(f"{len(arrays)} arrays for {len(req.outputs)} outputs")
    for i, a in enumerate(arrays):
        np.save(Path(req.workdir) / f"output_{i}.npy", np.asarray(a, dtype=np.float32))
    (Path(req.workdir) / "result.json").write_text(json.dumps(info, indent=1))


def read_result(workdir: Path, n: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    workdir = Path(workdir)
    info = json.loads((workdir / "result.json").read_text())
    return [np.load(workdir / f"output_{i}.npy") for i in range(n)], info
