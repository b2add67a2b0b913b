"""Where weight buffers sit in memory: every gate matrix starts on a 64-byte boundary.

A register block loads a whole cache line (one zmm, two ymm) of a panel at a time. numpy's
buffers are only 16-byte aligned (a large malloc is a page plus a 16-byte header), so each such
load used to straddle two lines, and how fast a model ran depended on where malloc put it.
Measured on Zen 4 (1 thread, weights misaligned by 16 bytes -> aligned, ``bench/align_probe.py``):
the int8 x 16-bit product at (K, C) = (1536, 4096) 81 -> 66 us, at (768, 2048) 20.7 -> 17.6 us;
the float32 one-stream product at (64, 256) 0.65 -> 0.58 us. Batched float32 products (4 streams
per load, compute-bound) were unaffected.

Offsets inside a buffer are the layout's business (``layout.Plan``: every piece of ``wbuf``
starts at ``W_CONSTS`` plus a multiple of 16 elements); this module only places buffers so that
those offsets land on line boundaries. It is a placement policy, not a layout: nothing in a
packed file or a kernel depends on it, only speed does. ``packed.save`` aligns the tensors in the
file the same way, so a memory-mapped model is aligned too.
"""

from __future__ import annotations

import numpy as np

#: Bytes: one cache line, one 512-bit vector.
WEIGHT_ALIGN = 64


def empty(n: int, dtype, lead: int = 0) -> np.ndarray:
    """An uninitialised (n,) array of ``dtype`` whose element ``lead`` starts on a
    :data:`WEIGHT_ALIGN` boundary (``lead = layout.W_CONSTS`` for a ``wbuf``)."""
    dt = np.dtype(dtype)
    raw = np.empty(int(n) * dt.itemsize + WEIGHT_ALIGN, np.uint8)
    shift = (-(raw.ctypes.data + int(lead) * dt.itemsize)) % WEIGHT_ALIGN
    return raw[shift : shift + int(n) * dt.itemsize].view(dt)


def is_aligned(a: np.ndarray, lead: int = 0) -> bool:
    """Whether element ``lead`` of the C-contiguous ``a`` starts on a boundary."""
    return (a.ctypes.data + int(lead) * a.itemsize) % WEIGHT_ALIGN == 0


def aligned(a: np.ndarray, lead: int = 0) -> np.ndarray:
    """``a`` itself if it is C-contiguous and aligned (see :func:`empty`), else an aligned
    C-contiguous copy of the same shape and dtype."""
    a = np.asarray(a)
    if a.flags.c_contiguous and is_aligned(a, lead):
        return a
    out = empty(a.size, a.dtype, lead).reshape(a.shape)
    out[...] = a
    return out
