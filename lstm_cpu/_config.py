"""Numba settings, decided in one place and read once at import time.

Threading layer
---------------
We leave Numba's own choice alone (its priority is ``tbb``, ``omp``, then ``workqueue``, and a
user's ``NUMBA_THREADING_LAYER`` wins): changing Numba's global priority would change it for
every other Numba user in the host process. What the layers cost:

* ``workqueue`` (Numba's fallback) costs tens of microseconds per parallel region on a 2-core box
  when the other core is busy, and it *aborts the process* ("Concurrent access has been
  detected") when two threads enter a parallel function at once: fatal for a service where many
  streams step concurrently.
* ``omp`` (GNU OpenMP here) costs a few microseconds per region and is safe to enter from many
  threads. ``tbb`` is as good but needs a TBB build that Numba accepts (``pip install tbb`` alone
  did not satisfy numba 0.68 on our machines).

A user's own ``NUMBA_THREADING_LAYER`` is respected. If whatever loads turns out to be
``workqueue``, ``kernels.parallel_guard`` serialises parallel calls with a lock so the process
never aborts (the serial kernel needs no lock and is what multi-threaded callers should use anyway).

This module is a leaf: settings only, read at import time by ``kernels.py``; it imports no kernel.

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

import numba

FASTMATH = {"contract"}
CACHE = os.environ.get("LSTM_CPU_NO_CACHE", "") not in ("1", "true", "yes")


def num_threads() -> int:
    """Numba's thread count for parallel kernels (``numba.set_num_threads`` / NUMBA_NUM_THREADS)."""
    return numba.get_num_threads()
