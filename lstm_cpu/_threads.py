"""Start Numba's threading layer without changing the host process's OpenMP settings.

What changes, exactly
---------------------
Numba starts its threading layer once per process, in ``numba.np.ufunc.parallel._launch_threads``,
on whichever thread first needs it: compiling a ``parallel=True`` function (parfor lowering),
loading one from the cache (``typed_passes._reload_parfors``), or ``numba.get_num_threads()`` /
``set_num_threads()``. For the ``omp`` layer that calls ``launch_threads(NUMBA_NUM_THREADS)`` in
``numba/np/ufunc/omppool.cpp``, which does::

    omp_set_num_threads(count);   // nthreads-var ICV      -> NUMBA_NUM_THREADS
    omp_set_nested(1);            // max-active-levels ICV -> libgomp's maximum

Nothing else touches OpenMP's state afterwards: each parallel region passes Numba's own count in
a ``num_threads(n)`` clause, and ``numba.set_num_threads`` only writes a thread-local of Numba's.
The process has one libgomp when torch is loaded (torch's ``libgomp.so.1`` is in the global
symbol scope, so omppool's ``omp_*`` calls bind to it), which is why ``torch.get_num_threads()``
read 2 after our first parallel call where the application had set 1 (and an application that set
2 while lstm-cpu was asked for 1 would read 1).

The fix
-------
``omp_set_num_threads`` writes the nthreads ICV of the *calling thread's* implicit task (libgomp's
``gomp_icv`` creates one from the global ICVs on a thread's first write; it dies with the
thread). So :func:`launch` starts the layer itself, once, on a short-lived helper thread: that
write lands on the helper and vanishes with it, and every application thread keeps the value it
had (or the global default, ``OMP_NUM_THREADS`` included). The max-active-levels ICV is one per
process in the libgomp torch ships (OpenMP 5.0 gave it device scope; measured: a helper thread's
``omp_set_nested(1)`` moved the main thread's value from 2147483647 to 255), so it is read before
the launch and written back after it, through the same libgomp omppool's calls bind to.
Numba's own thread count is process-wide (``_INIT_NUM_THREADS``), so our kernels still run on
``numba.get_num_threads()`` threads.

Launching lazily (not at import) matters: GNU OpenMP is not fork-safe, and Numba's omp layer
terminates a forked child that enters a parallel region after its parent launched the layer, so
a process that only ever uses the serial kernels should never launch it.

The hook
--------
Call :func:`launch` before anything that can start the layer: before ``numba.get_num_threads()``,
``numba.threading_layer()``, and before the first compile, cache load or call of a parallel
kernel. It is idempotent; after the first call it is one global read (0.1-0.2 us from Python
measured here, an empty call's cost), so it may sit on a hot path, though once per kernel
choice is enough. The first call costs about 25 ms (it loads the layer and starts a thread).
"""

from __future__ import annotations

import ctypes
import threading

_launched = False
_lock = threading.Lock()


def _omp_levels_api():
    """``(omp_get_max_active_levels, omp_set_max_active_levels)`` of the libgomp that Numba's omp
    layer binds to, or None when that layer cannot load.

    omppool is loaded with RTLD_LOCAL, and an undefined symbol of such a library is looked up in
    the global scope first (where torch puts its libgomp), then among its own dependencies: the
    two lookups below, in that order."""
    import numba

    if str(numba.config.THREADING_LAYER).lower() in ("tbb", "workqueue"):
        return None  # the user picked a layer that never touches OpenMP
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return None
    for handle in (None, omppool.__file__):
        try:
            lib = ctypes.CDLL(handle)
            get, put = lib.omp_get_max_active_levels, lib.omp_set_max_active_levels
        except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) off POSIX
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return get, put
    return None


def launch() -> None:
    """Start Numba's threading layer, if nobody has, leaving OpenMP's settings as they were.

    Idempotent (one global read once done). Raises what Numba raises when no threading layer can
    be loaded; nothing is changed then, and the next call tries again."""
    global _launched
    if _launched:
        return
    with _lock:
        if _launched:
            return
        import numba

        levels = _omp_levels_api()
        before = levels[0]() if levels else None
        failure = []

        def start():
            try:
                numba.get_num_threads()  # launches the layer if nobody has; else a no-op
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(e)

        t = threading.Thread(target=start, name="lstm_cpu-numba-launch", daemon=True)
        t.start()
        t.join()
        if levels and levels[0]() != before:
            levels[1](before)
        if failure:
            raise failure[0]
        _launched = True
