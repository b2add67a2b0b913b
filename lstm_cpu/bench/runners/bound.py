"""The bounds measured in the same run: numpy's BLAS over the same weights, and a memory copy.

A step must read every weight once. :class:`BoundRunner` times numpy's BLAS product over the
model's weights fused per layer and direction into ``(4H, in + out)`` (plus ``w_hr`` if
projected), in the same interleaved rounds as the runtimes: the "in-run bound".
:func:`memory_bandwidth` copies a large array: the machine's memory bandwidth.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import numpy as np

from .base import Runner


class BoundRunner(Runner):
    """numpy BLAS over the fused weights; each call costs a numpy call (~1 us) per matrix on top
    of BLAS, like any Python-driven loop."""

    name, kind, threads_of = "numpy BLAS (bound)", "bound", "blas"

    def __init__(self, layers, batch: int, steps_per_call: int = 1):
        self.steps_per_call = steps_per_call  # T matrix products per call in sequence mode
        mats = []
        for dirs in layers:
            for p in dirs:
                mats.append(np.concatenate([p.w_ih, p.w_hh], axis=1))  # (4H, in + out)
                if p.w_hr is not None:
                    mats.append(p.w_hr)  # (P, H)
        # (W (rows, cols), z (cols, B) or (cols,) at batch 1, out (rows, B) or (rows,))
        vec = batch == 1
        self.mats = [(np.ascontiguousarray(w, np.float32),
                      np.ones(w.shape[1] if vec else (w.shape[1], batch), np.float32),
                      np.empty(w.shape[0] if vec else (w.shape[0], batch), np.float32))
                     for w in mats]

    def make_call(self):
        mats, matmul, steps = self.mats, np.matmul, range(self.steps_per_call)

        def call():
            for _ in steps:
                for w, z, o in mats:
                    matmul(w, z, out=o)

        return call


def memory_bandwidth(mb: int, reps: int = 3) -> Optional[Dict[str, float]]:
    """Best-of-``reps`` numpy copy of an ``mb`` MB float32 array; read + write bytes counted."""
    if mb <= 0:
        return None
    n = mb * (1 << 20) // 4
    src = np.ones(n, np.float32)  # (n,) touched once so that page faults are not timed
    dst = np.zeros_like(src)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"array_mb": mb, "copy_gb_s": 2 * src.nbytes / best / 1e9,
            "method": "numpy copyto, read+write"}
