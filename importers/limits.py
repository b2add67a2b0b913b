"""Limits and dtype widening shared by every importer (ONNX and PyTorch).

A file may claim any shape; these bounds are checked *before* anything is allocated, so a hostile
or corrupt file fails with :class:`FormatError` instead of exhausting memory.
"""

from __future__ import annotations

import math

import numpy as np

from lstm_cpu.errors import FormatError

#: Refuse any single tensor with more elements than this before reading it (4 GiB of float32).
MAX_TENSOR_ELEMENTS = 1 << 30
#: Refuse any dimension (and hidden_size, input_size, ...) larger than this.
MAX_DIM = 1 << 24


def check_dims(dims, what: str) -> int:
    """The element count of a tensor of shape ``dims``, after checking every dimension against
    :data:`MAX_DIM` and the count against :data:`MAX_TENSOR_ELEMENTS`. ``what`` names the tensor
    in the error ("tensor 'W'", "node 'lstm': input W")."""
    for d in dims:
        if d < 0 or d > MAX_DIM:
            raise FormatError(f"{what}: dimension {d} of shape {list(dims)} is outside [0, {MAX_DIM}]")
    n = math.prod(dims)
    if n > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{what}: shape {list(dims)} has {n} elements, more than the limit {MAX_TENSOR_ELEMENTS}")
    return n


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (any shape, uint16) -> float32 of the same shape, exactly.

    numpy has no bfloat16; a bfloat16 is the top half of a float32, so the widening is a shift.
    """
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


__all__ = ["MAX_TENSOR_ELEMENTS", "MAX_DIM", "check_dims", "widen_bfloat16"]
