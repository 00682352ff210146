"""Real Darknet as a runtime: Debian's ``darknet`` package.

Debian ships pjreddie/darknet at 61c9d02e (2018-09-14) as
/usr/lib/darknet/libdarknet.so with /usr/lib/darknet/include/darknet.h,
built for the CPU: batch norm divides by ``sqrt(var) + 1e-6``
(src/blas.c normalize_cpu), bnfix's default ``pjreddie-cpu`` source.
Install: ``apt-get install -y --no-install-recommends darknet`` (plus a C
compiler). ``darknet_forward.c`` is compiled against it at test time.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DARKNET_DIR = Path("/usr/lib/darknet")
HEADER = DARKNET_DIR / "include" / "darknet.h"
LIBRARY = DARKNET_DIR / "libdarknet.so"
HARNESS_SRC = Path(__file__).with_name("darknet_forward.c")


def missing_reason() -> str | None:
    """Why the real-Darknet test cannot run here, or None if it can."""
    if not HEADER.is_file() or not LIBRARY.is_file():
        return (f"libdarknet not installed ({HEADER} / {LIBRARY} missing); "
                "Debian/Ubuntu: apt-get install -y --no-install-recommends darknet")
    if not compiler():
        return "no C compiler (cc/gcc) to build tests/runtimes/darknet_forward.c"
    return None


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def build_harness(workdir: Path) -> Path:
    exe = Path(workdir) / "darknet_forward"
    cmd = [compiler(), "-O2", "-Wall", "-o", str(exe), str(HARNESS_SRC),
           f"-I{HEADER.parent}", f"-L{DARKNET_DIR}", f"-Wl,-rpath,{DARKNET_DIR}",
           "-ldarknet", "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling the Darknet harness failed:\n{' '.join(cmd)}\n{res.stderr}")
    return exe


def forward(exe: Path, cfg: Path, weights: Path, x: np.ndarray,
            layers: Sequence[int], workdir: Path) -> list[np.ndarray]:
    """Run one forward pass in libdarknet; return the outputs of `layers`
    (0-based Darknet indices) as float32 arrays shaped like `x` (1,C,H,W)."""
    workdir = Path(workdir)
    inp = workdir / "input.f32"
    np.ascontiguousarray(x, dtype="<f4").tofile(inp)
    res = subprocess.run([str(exe), str(cfg), str(weights), str(inp), str(workdir),
                          *map(str, layers)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"darknet_forward exited {res.returncode}:\n{res.stderr[-3000:]}")
    shapes = {}
    for line in res.stdout.splitlines():
        f = line.split()
        if f[0] == "layer":
            i, _type, w, h, c, n = map(int, f[1:])
            assert w * h * c == n, line
            shapes[i] = (1, c, h, w)
    return [np.fromfile(workdir / f"layer_{i}.f32", dtype="<f4").reshape(shapes[i])
            for i in layers]
