"""lstm-cpu itself: ``model.stream(...).step(x)`` per call, or ``model.run(x)`` per sequence."""

from __future__ import annotations

import time
from typing import Tuple

import numpy as np

from ..config import BenchConfig
from .base import Runner


class OursRunner(Runner):
    name, kind, threads_of = "lstm-cpu", "ours", "numba"

    def __init__(self, model, cfg: BenchConfig):
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def _stream(self):
        return self.model.stream(batch=None if self.cfg.mode == "step" else self.cfg.batch)

    def outputs(self, xs):
        # xs (T, B, I). Step modes: one step at a time through a stream, like the timed calls.
        if self.cfg.mode == "sequence":
            y, _ = self.model.run(xs)
            return np.asarray(y)  # (T, B, D*out|O)
        s = self._stream()
        ys = []
        for t in range(xs.shape[0]):
            x = xs[t, 0] if self.cfg.mode == "step" else xs[t]  # (I,) or (B, I)
            ys.append(np.array(s.step(x), copy=True).reshape(xs.shape[1], -1))
        return np.stack(ys)  # (T, B, out)

    def first_call(self, x) -> Tuple[float, float]:
        """(seconds to create a stream, seconds of its first call): JIT compile or cache load if
        it is the first call in the process, else the cold-cache cost of a new stream."""
        if self.cfg.mode == "sequence":
            t0 = time.perf_counter()
            self.model.run(x)
            return 0.0, time.perf_counter() - t0
        t0 = time.perf_counter()
        s = self._stream()
        t1 = time.perf_counter()
        s.step(x)
        return t1 - t0, time.perf_counter() - t1

    def make_call(self):
        x = self.x
        if self.cfg.mode == "sequence":
            run = self.model.run
            return lambda: run(x)
        step = self._stream().step
        return lambda: step(x)
