"""Stream snapshots: a stream's exact state as bytes, tied to the model that produced it.

A blob is plain little-endian binary, read with ``struct`` and ``np.frombuffer`` only (never
unpickled)::

    magic   8 bytes  b"LSTMSNAP"
    version u32      1
    model   32 bytes sha256 fingerprint of the model (:func:`fingerprint`)
    steps   u64      steps the stream has taken
    L, out, H u32    layers, output width of h, hidden width of c
    item    u32      4 (float32) or 8 (float64)
    h       L*out items    (L, out): each layer's h
    c       L*H items      (L, H): each layer's c
    crc32   u32      of everything before it

The same format is a checkpoint in Ray's object store and the hand-over of a migrating stream.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np

from .errors import ModelMismatch, SnapshotError

MAGIC = b"LSTMSNAP"
VERSION = 1
_HEAD = struct.Struct("<8sI32sQIIII")  # magic, version, fingerprint, steps, L, out, H, itemsize
_CRC = struct.Struct("<I")


def fingerprint(model) -> bytes:
    """sha256 over everything that decides a stream's outputs: sizes, activations, flags,
    every weight (the canonical ``layer_params()`` and head, as float64 little-endian), the
    initial state and the dtype. Independent of the packing, so it survives a re-pack."""
    d = hashlib.sha256()
    info = model.info()
    keep = ("input_size", "hidden_size", "proj_size", "num_layers", "num_directions",
            "output_size", "head_size", "activations", "clip", "input_forget", "reverse",
            "peepholes", "dtype")
    d.update(repr([(k, info[k]) for k in keep]).encode())

    def arr(a):
        if a is None:
            d.update(b"-")
        else:
            a = np.ascontiguousarray(a, dtype="<f8")
            d.update(repr(a.shape).encode())
            d.update(a.tobytes())

    for row in model.layer_params():
        for p in row:
            for a in (p.w_ih, p.w_hh, p.bias, p.w_hr, p.peephole):
                arr(a)
    head = model.head
    arr(None if head is None else head[0])
    arr(None if head is None else head[1])
    if model.num_directions == 1 and not model.reverse:
        h0, c0 = model.stream().state  # (L, out), (L, H): the initial state streams start from
        arr(h0)
        arr(c0)
    return d.digest()


def pack(fp: bytes, steps: int, h: np.ndarray, c: np.ndarray) -> bytes:
    """A blob from a fingerprint, a step count and a state h (L, out), c (L, H)."""
    L, out = h.shape
    head = _HEAD.pack(MAGIC, VERSION, fp, int(steps), L, out, c.shape[1], h.dtype.itemsize)
    body = head + np.ascontiguousarray(h).astype(h.dtype.newbyteorder("<")).tobytes() \
        + np.ascontiguousarray(c).astype(c.dtype.newbyteorder("<")).tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def unpack(blob, fp: bytes, L: int, out: int, H: int, dtype) -> tuple:
    """``(steps, h (L, out), c (L, H))`` from a blob of this model, or a typed error.

    SnapshotError: not bytes, truncated, bad magic/version/checksum, sizes that do not fit.
    ModelMismatch: a valid snapshot of another model."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"snapshot: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _HEAD.size + _CRC.size:
        raise SnapshotError(f"snapshot: {len(blob)} bytes is shorter than its header "
                            f"({_HEAD.size + _CRC.size} bytes)")
    magic, version, bfp, steps, bL, bout, bH, item = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError(f"snapshot: expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise SnapshotError(f"snapshot: unsupported version {version} (this build reads {VERSION})")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if zlib.crc32(blob[:-_CRC.size]) != crc:
        raise SnapshotError("snapshot: checksum mismatch (corrupt or truncated)")
    if bfp != fp:
        raise ModelMismatch(f"snapshot: taken from a different model (fingerprint "
                            f"{bfp.hex()[:16]}..., this model {fp.hex()[:16]}...)")
    dt = np.dtype(dtype)
    if (bL, bout, bH, item) != (L, out, H, dt.itemsize):
        raise SnapshotError(f"snapshot: sizes (L={bL}, out={bout}, H={bH}, {item}-byte items) do "
                            f"not fit this model (L={L}, out={out}, H={H}, {dt.itemsize}-byte)")
    n_h, n_c = L * out, L * H
    if len(blob) != _HEAD.size + (n_h + n_c) * item + _CRC.size:
        raise SnapshotError(f"snapshot: {len(blob)} bytes, expected "
                            f"{_HEAD.size + (n_h + n_c) * item + _CRC.size}")
    le = dt.newbyteorder("<")
    h = np.frombuffer(blob, le, n_h, _HEAD.size).astype(dt).reshape(L, out)  # (L, out)
    c = np.frombuffer(blob, le, n_c, _HEAD.size + n_h * item).astype(dt).reshape(L, H)  # (L, H)
    return steps, h, c
