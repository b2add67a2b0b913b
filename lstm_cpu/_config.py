"""Numba settings, decided in one place and read once at import time.

Threading layer
---------------
We ask for ``omp`` first, then ``tbb``, and only then ``workqueue``:

* ``workqueue`` (Numba's fallback) costs tens of microseconds per parallel region on a 2-core box
  when the other core is busy, and it *aborts the process* ("Concurrent access has been
  detected") when two threads enter a parallel function at once: fatal for a service where many
  streams step concurrently.
* ``omp`` (GNU OpenMP here) costs a few microseconds per region and is safe to enter from many
  threads. ``tbb`` is as good but needs a TBB build that Numba accepts (``pip install tbb`` alone
  did not satisfy numba 0.68 on our machines).

A user's own ``NUMBA_THREADING_LAYER`` is respected. If whatever loads turns out to be
``workqueue``, :func:`parallel_guard` serialises parallel calls with a lock so the process never
aborts (the serial kernel needs no lock and is what multi-threaded callers should use anyway).

fastmath
--------
Only ``contract`` (fused multiply-add). No reassociation: the kernels vectorise across columns,
which needs none, and a fixed float order keeps results reproducible across thread counts and
runs. No ``nnan``/``ninf``: NaN and Inf must propagate (see the README's NaN policy).

Cache
-----
``cache=True`` on every kernel. When the package directory is read-only Numba itself falls back
to a per-user cache directory; ``NUMBA_CACHE_DIR`` overrides both.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext

import numba
from numba import config as _nb_config

FASTMATH = {"contract"}
CACHE = os.environ.get("LSTM_CPU_NO_CACHE", "") not in ("1", "true", "yes")

if "NUMBA_THREADING_LAYER" not in os.environ:
    _nb_config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_layer_lock = threading.Lock()
_workqueue_lock = threading.Lock()
_layer = None


def threading_layer() -> str:
    """The threading layer Numba loaded ("omp", "tbb" or "workqueue"); loads it if needed."""
    global _layer
    if _layer is None:
        with _layer_lock:
            if _layer is None:
                try:
                    _layer = numba.threading_layer()
                except ValueError:  # not initialised yet: run a trivial parallel function
                    from .kernels import _touch_parallel

                    _touch_parallel()
                    _layer = numba.threading_layer()
    return _layer


def parallel_guard():
    """A context manager for calling a parallel kernel: a lock under ``workqueue``, else nothing."""
    if threading_layer() == "workqueue":
        return _workqueue_lock
    return nullcontext()


def num_threads() -> int:
    return numba.get_num_threads()
