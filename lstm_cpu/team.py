"""A team of threads inside one parallel region: atomics and the work-claiming protocol.

Why
---
A parallel region costs 3-5 us to open with Numba's ``omp`` layer (bench/PERF_NOTES: 4.4 us
for an empty one). A whole sequence run as two ``prange`` loops per layer and time step pays
that 2 x L x T times: at (128,256,2), T=200 on 2 threads, about 13 of the 30 us a step took.
The team kernels (``kernels.layer_sequence_parallel``) open one region per layer and direction
instead: its ``P`` iterations (the *participants*) walk the time steps together, each doing its
own share of every phase (panel ranges of the product, then unit ranges of the cells), and wait
for each other between phases on a counter in shared memory. A cross-core wait costs a few cache
line transfers (about 0.1-0.3 us) instead of a region.

The protocol, and why it cannot hang
------------------------------------
A phase is a list of tasks. ``claims`` holds one slot per task (a cache line each, so two
participants never write the same line for their own tasks); a task of the phase numbered ``k``
(0, 1, 2, ... counted per task list) is claimed by swapping its slot from ``k`` to ``k + 1``
(compare-and-swap: exactly one participant wins). Every participant first claims its own tasks
(the same ones every step: the same part of W stays in its core's cache), then any task still
unclaimed, then waits until the shared ``done`` counter, bumped once per finished task, shows
every task of the phase finished.

* Nothing waits for a task nobody has started: whoever reaches the wait has claimed or seen
  claimed every task of the phase, and a claimed task is being run by a participant that is
  running (tasks never wait). So the wait ends once those tasks finish.
* If the threading layer runs the participants one after another on one thread (a TBB arena, a
  thread count lower than P, a nested region), the first participant claims every task and runs
  the whole sequence alone; the others find everything claimed and done, and return. Same bits.
* If a worker thread is descheduled (a loaded box), the others take its unclaimed tasks instead
  of waiting for it to wake up.

Every output element is still computed by exactly one task in a fixed float order, so the
results are bit-identical to the serial kernel whoever runs which task.

Memory order: ``atomic_add`` and the claim are sequentially consistent read-modify-writes, and
the waits read ``done`` with acquire order, so what a task wrote before bumping ``done`` is
visible to every participant that has seen the bump.

Layout of ``sync`` (int64, 1-D, zeroed by the caller per region, :func:`sync_size` elements)::

    sync[0]                         done counter (its own cache line)
    sync[SLOT * (1 + j)]            claim slot of task j of the team's task lists (one line each)
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _config, aligned

#: int64 elements per cache line: one claim slot (and the done counter) per line.
SLOT = 8

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def sync_size(tasks: int) -> int:
    """int64 elements of a ``sync`` array for ``tasks`` claim slots (all task lists together)."""
    return SLOT * (1 + int(tasks))


def _slot_pointer(context, builder, arrty, arr, idx, idxty):
    ary = context.make_array(arrty)(context, builder, arr)
    i = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [i], wraparound=False,
                                    boundscheck=False)


def _int64_vector(arr):
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` as one sequentially consistent atomic; returns the old value."""
    if not (_int64_vector(arr) and isinstance(idx, types.Integer) and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _slot_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(arr, idx, val), codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """Set ``arr[idx]`` to ``new`` if it holds ``expected``, atomically (sequentially
    consistent); True if this call made the change."""
    if not (_int64_vector(arr) and isinstance(idx, types.Integer)
            and isinstance(expected, types.Integer) and isinstance(new, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _slot_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        e = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        res = builder.cmpxchg(ptr, e, n, "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return types.boolean(arr, idx, expected, new), codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` read with acquire order (never cached in a register across a spin)."""
    if not (_int64_vector(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _slot_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 ``pause`` hint inside a spin-wait (nothing elsewhere): it lets the sibling
    hyperthread run and avoids the memory-order flush when the awaited line changes."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


_POSIX = os.name == "posix"


@intrinsic
def os_yield(typingctx):
    """``sched_yield()`` (POSIX; nothing elsewhere): give this core to another runnable thread.
    Declared by name, not through a ctypes pointer, so the kernels calling it stay cacheable."""

    def codegen(context, builder, sig, args):
        if _POSIX:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


#: Pauses a waiting participant spins before it starts yielding its core (about 5 us on Zen 4,
#: longer than a balanced phase's wait). Spinning alone, a participant whose partner shares its
#: core (more runnable threads than cores) would keep the partner off that core for a whole
#: time slice. (It does not cure the worst case seen, another process's or library's threads
#: busy on the other core: every parallel region, this one's or OpenMP's, then waits at its end
#: for a worker the scheduler has not run yet, up to a time slice: README, "Threads".)
SPINS_BEFORE_YIELD = 256

_FLAGS = dict(nogil=True, cache=_config.CACHE, error_model="numpy")


@njit(inline="always", **_FLAGS)
def claim(sync, base, j, k):
    """Claim task j (of the task list whose slots start at task index ``base``) for its phase
    numbered k of that list; True if this participant won it."""
    slot = SLOT * (1 + base + j)
    if atomic_load(sync, slot) != k:
        return False  # someone has it already: no write to the line
    return atomic_cas(sync, slot, k, k + 1)


@njit(inline="always", **_FLAGS)
def finished(sync):
    """One more task done (release: what the task wrote is visible to whoever sees the count)."""
    atomic_add(sync, 0, 1)


@njit(inline="always", **_FLAGS)
def wait_done(sync, target):
    """Wait until ``target`` tasks in all are done: spin briefly, then yield the core between
    checks (see :data:`SPINS_BEFORE_YIELD`)."""
    spins = 0
    while atomic_load(sync, 0) < target:
        if spins < SPINS_BEFORE_YIELD:
            spin_pause()
            spins += 1
        else:
            os_yield()


def new_sync(tasks: int) -> np.ndarray:
    """A zeroed ``sync`` array (int64, :func:`sync_size` elements) for one team region, starting
    on a cache line: so the counter and each claim slot have a line of their own, shared with
    nothing else the process writes."""
    s = aligned.empty(sync_size(tasks), np.int64)
    s[:] = 0
    return s


__all__ = ["SLOT", "SPINS_BEFORE_YIELD", "sync_size", "new_sync", "atomic_add", "atomic_cas",
           "atomic_load", "spin_pause", "os_yield", "claim", "finished", "wait_done"]
