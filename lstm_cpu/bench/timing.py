"""Timing: warm-up, interleaved rounds, per-call latency statistics, cold start in new processes.

Runtimes are timed in interleaved rounds: each round runs one block of calls per runtime, in a
rotating order, so slow drift of the machine (another job, frequency, thermal) hits all runtimes
alike. Every call is timed on its own, so the report has a latency distribution.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from .config import BenchConfig
from .runners.base import Runner


def latency_stats(ns: np.ndarray, steps_per_call: int, batch: int = 1) -> Dict[str, float]:
    """Per-step statistics (µs) from per-call durations ``ns (calls,)`` in nanoseconds; one call
    does ``steps_per_call`` time steps and a step advances ``batch`` streams."""
    us = ns.astype(np.float64) / 1e3 / steps_per_call  # (calls,) µs per time step
    total_s = ns.sum() / 1e9
    return {
        "calls": int(ns.size),
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
        "steps_per_s": float(ns.size * steps_per_call / total_s) if total_s > 0 else math.inf,
        "samples_per_s": float(ns.size * steps_per_call * batch / total_s) if total_s > 0 else math.inf,
    }


class Progress:
    """tqdm if installed, else a plain stderr bar; silent when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.enabled, self.desc, self.n = total, enabled, desc, 0
        self.bar = None
        self._last = -1
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional

            self.bar = tqdm(total=total, desc=desc, unit="call", file=sys.stderr, leave=False,
                            mininterval=0.25)
        except ImportError:
            pass

    def update(self, n: int):
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = int(100 * self.n / max(self.total, 1))
        if pct != self._last:
            self._last = pct
            fill = pct * 30 // 100
            sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (30 - fill)}] {pct:3d}%")
            sys.stderr.flush()

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def warm_up(runners: List[Runner], calls: Dict[str, Callable], n: int,
            pin: Callable[[Runner], None]) -> Dict[str, float]:
    """``n`` untimed calls per runner (at least one); returns seconds per call of each."""
    per_call_s = {}
    for r in runners:
        pin(r)
        fn, k = calls[r.name], max(n, 1)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        per_call_s[r.name] = (time.perf_counter() - t0) / k
    return per_call_s


#: Seconds to wait before each block when runtimes use more than one thread: a runtime's worker
#: threads keep spinning after its block (onnxruntime's pool, OpenMP), and on a 2-core box they
#: took the core the next runtime's worker needed (measured: our 64-stream parallel step at
#: (512,1024,1) 8.0 ms right after onnxruntime's block, 4.0 ms alone).
SETTLE_S = 0.05

#: ... and this long after numpy's BLAS (the bound row): OpenBLAS's idle workers spin, calling
#: sched_yield, for about 2^28 cycles (OPENBLAS_THREAD_TIMEOUT's default, 0.1 s here) after each
#: call. Any parallel region starting meanwhile waits for a worker the spinner keeps off its
#: core: our (128,256,2) parallel run measured 110-160 us per step 50 ms after a BLAS call, 17
#: after 200 ms (and the previous per-step kernel 60 ms a run). Applications that call BLAS on
#: all cores right before lstm-cpu's parallel kernels see the same (README, "Threads").
SETTLE_AFTER_BLAS_S = 0.25


def time_interleaved(runners: List[Runner], calls: Dict[str, Callable], steps: int, rounds: int,
                     progress: Progress, pin: Callable[[Runner], None],
                     settle: float = 0.0) -> Dict[str, np.ndarray]:
    """Per-call durations (ns) per runner, ``rounds`` round-robin blocks, rotating the order.

    ``pin(runner)`` sets the runner's thread count right before each of its blocks; ``settle``
    seconds of sleep before each block let the previous runtime's spinning workers go idle.
    """
    block = math.ceil(steps / rounds)
    out: Dict[str, List[int]] = {r.name: [] for r in runners}
    pc = time.perf_counter_ns
    previous = None
    for rnd in range(rounds):
        k = rnd % len(runners)
        for r in runners[k:] + runners[:k]:
            fn = calls[r.name]
            n = min(block, steps - len(out[r.name]))
            if n <= 0:
                continue
            if settle:
                after_blas = previous is not None and previous.kind == "bound"
                time.sleep(max(settle, SETTLE_AFTER_BLAS_S) if after_blas else settle)
            previous = r
            pin(r)
            fn()  # one untimed call: the previous runtime's weights evicted ours from cache
            stamps = [pc()]
            append = stamps.append
            for _ in range(n):
                fn()
                append(pc())
            out[r.name].extend(np.diff(np.asarray(stamps, np.int64)).tolist())
            progress.update(n)
    return {name: np.asarray(v, np.int64) for name, v in out.items()}


# =============================================================================================
# Cold start in fresh processes
# =============================================================================================
_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import lstm_cpu
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
if cfg["model_path"]:
    model = lstm_cpu.load(cfg["model_path"], **cfg["load_options"])
else:
    from lstm_cpu.bench.models import embedded_model
    model = embedded_model(cfg["size"], cfg["seed"])
t2 = time.perf_counter()
x = np.zeros(model.input_size, np.float32)
s = model.stream()
s.step(x)
t3 = time.perf_counter()
s.step(x)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "first_step_s": t3 - t2,
                  "second_step_us": (t4 - t3) * 1e6}))
"""


def cold_process(cfg: BenchConfig, empty_cache: bool) -> Dict[str, object]:
    """Import, model build and first step of a fresh interpreter, from Numba's on-disk cache or
    (``empty_cache``) with an empty cache directory, i.e. a true JIT compile."""
    import lstm_cpu  # noqa: PLC0415

    env = dict(os.environ)
    opts = {k: v for k, v in cfg.load_options.items() if v is not None}
    arg = json.dumps({"model_path": cfg.model_path, "load_options": opts,
                      "size": list(cfg.size), "seed": cfg.seed})
    # The fresh process imports the same lstm_cpu as this one (a checkout or an install).
    root = os.path.dirname(os.path.dirname(os.path.abspath(lstm_cpu.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        if empty_cache:
            env["NUMBA_CACHE_DIR"] = tmp
        p = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, arg], env=env,
                           capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])
