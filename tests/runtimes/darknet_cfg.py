"""What the runtime tests need from a Darknet .cfg, on top of ``bnfix.darknet.read_cfg``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bnfix.darknet import read_cfg


def head_layers(cfg: Path) -> list[int]:
    """0-based indices of the layers whose output a [yolo] layer consumes."""
    layers = read_cfg(cfg)[1:]  # [net] is not a layer
    return [i - 1 for i, s in enumerate(layers) if s.name == "yolo"]


def write_batch1_cfg(cfg: Path, dest: Path) -> Path:
    """Copy of `cfg` with batch=1 and subdivisions=1 in [net].

    Darknet allocates every buffer for batch/subdivisions images when it
    parses the cfg (32 here: gigabytes); nothing else changes.
    """
    lines = Path(cfg).read_text().splitlines()
    net = read_cfg(cfg)[0]
    for key in ("batch", "subdivisions"):
        if key in net.option_lines:
            lines[net.option_lines[key] - 1] = f"{key}=1"
    dest = Path(dest)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def fixed_input(cfg: Path, seed: int = 0) -> np.ndarray:
    """Deterministic 1xCxHxW float32 input in [0, 1), like a normalised image."""
    net = read_cfg(cfg)[0].options
    shape = (1, int(net["channels"]), int(net["height"]), int(net["width"]))
    return np.random.default_rng(seed).random(shape, dtype=np.float32)
