"""lstm-cpu's packed file format: the packed buffers in a safetensors-layout file, numpy only.

Layout (the safetensors layout, so standard tools can list it)::

    u64 little-endian  header length n
    n bytes            JSON header: {"meta": {...}, "fpar": {...}, "wbuf": {...},
                                     ["init_h": ..., "init_c": ...],
                                     "__metadata__": {"format": "lstm-cpu-packed", "version": "1",
                                                      "sha256": <hex of the data section>,
                                                      "source": <JSON of model.info()["source"]>}}
    data section       the tensors, 8-byte aligned, at their "data_offsets"

Why not pickle or the safetensors package: the runtime must load a model with numpy and numba
only, and never run code from a file. Loading reads the weights (or memory-maps them with
``mmap=True``), checks the
SHA-256 of the data section (a truncated or tampered file is refused, never loaded as garbage),
and recomputes the packed layout from the sizes the file states (``layout.plan``): the kernels do
no bounds checks, so a file whose offsets differ from the plan is refused before any kernel runs.
"""

from __future__ import annotations

import hashlib
import json
import mmap as _mmap
import os
import struct
import tempfile

import numpy as np

from . import layout as lay
from .errors import FormatError, UnsupportedModelError

FORMAT_NAME = "lstm-cpu-packed"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 20  # our headers are ~1 KB; anything near this is not ours
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_DIM = 1 << 24  # no real LSTM has a size near 16M


def save(model, path) -> None:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    tensors = [("meta", model._meta), ("fpar", model._fpar)]
    if model._init is not None:
        tensors += [("init_h", model._init[0]), ("init_c", model._init[1])]
    tensors.append(("wbuf", model._wbuf))
    header, blobs, offset = {}, [], 0
    for name, a in tensors:
        a = np.ascontiguousarray(a)
        raw = a.tobytes()
        pad = (-len(raw)) % 8
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    data = b"".join(blobs)
    header["__metadata__"] = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": json.dumps(model._source, default=str),
    }
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lstm-cpu-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_header(f, size: int, path: str) -> dict:
    """Read and bound-check a safetensors-layout header; FormatError on anything off."""
    if size < 8:
        raise FormatError(f"{path}: file is {size} bytes, too short for a header")
    n = struct.unpack("<Q", f.read(8))[0]
    if n > _MAX_HEADER or n > size - 8:
        raise FormatError(f"{path}: header length {n} is impossible for a {size}-byte file")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise FormatError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header


def is_packed_header(header: dict) -> bool:
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def load(path, kernel="auto", mmap=False):
    """Load a packed model; FormatError for anything corrupt, truncated or inconsistent.

    By default the weights are read into memory. ``mmap=True`` memory-maps them instead (no
    copy, pages shared between processes): then the file must not be truncated or rewritten in
    place while the model lives, or the process dies with SIGBUS. ``model.save`` never does that
    (it writes a new file and renames it over the old one).
    """
    from .model import LSTMModel

    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"cannot open {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        header = read_header(f, size, path)
        data_start = 8 + struct.unpack("<Q", _peek8(path))[0]
        md = header.get("__metadata__")
        if not is_packed_header(header):
            raise FormatError(f"{path}: not an lstm-cpu packed file (no '{FORMAT_NAME}' metadata)")
        version = md.get("version")
        if not (isinstance(version, str) and version.isdigit()):
            raise FormatError(f"{path}: version field must be a number, got {version!r}")
        if int(version) > FORMAT_VERSION:
            raise UnsupportedModelError(
                f"{path}: packed format version {version} is newer than this lstm-cpu reads "
                f"(up to {FORMAT_VERSION}); upgrade lstm-cpu")
        data_len = size - data_start
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _check_entry(path, name, e, data_len)
        for req in ("meta", "fpar", "wbuf"):
            if req not in entries:
                raise FormatError(f"{path}: tensor '{req}' is missing")
        # save() packs the tensors back to back, each padded to 8 bytes: anything after the last
        # one is not ours (and would cost a hash pass over arbitrary trailing data).
        end = max(b + int(np.prod(shp)) * np.dtype(dt).itemsize for dt, shp, b in entries.values())
        if data_len != end + (-end) % 8:
            raise FormatError(f"{path}: the data section is {data_len} bytes but its tensors end at "
                              f"{end}: the file has trailing bytes or is truncated")
        if mmap:
            with _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) as mm:
                digest = hashlib.sha256(memoryview(mm)[data_start:]).hexdigest()
            data = None
        else:
            # One read: the bytes we checksum are the bytes we use (no window to swap the file).
            f.seek(data_start)
            data = f.read(data_len)
            if len(data) != data_len:
                raise FormatError(f"{path}: the file changed while it was read (short read)")
            digest = hashlib.sha256(data).hexdigest()
        if digest != md.get("sha256"):
            raise FormatError(f"{path}: checksum mismatch: the file is truncated or was modified "
                              f"(expected sha256 {str(md.get('sha256'))[:16]}..., got {digest[:16]}...)")
    for name, want in (("meta", np.int64), ("fpar", np.float64)):
        if entries[name][0] is not want:
            raise FormatError(f"{path}: tensor '{name}' must be {np.dtype(want).name}, "
                              f"got {np.dtype(entries[name][0]).name}")
    arrays = {name: _tensor(path, data_start, data, *e) for name, e in entries.items()}
    meta, fpar, wbuf = arrays["meta"], arrays["fpar"], arrays["wbuf"]
    meta = np.array(meta)  # small; a private copy so nothing can change it under the kernels
    fpar = np.array(fpar)
    _check_plan(path, meta, fpar, wbuf)
    init = None
    if "init_h" in arrays or "init_c" in arrays:
        init = _check_init(path, meta, wbuf.dtype, arrays.get("init_h"), arrays.get("init_c"))
    try:
        source = json.loads(md.get("source", "{}"))
        if not isinstance(source, dict):
            source = {}
    except (TypeError, json.JSONDecodeError):
        source = {}
    source = dict(source, packed_path=path)
    source.setdefault("format", "lstm-cpu-packed")
    return LSTMModel._from_packed(wbuf, meta, fpar, init, source, kernel)


def _peek8(path):
    with open(path, "rb") as f:
        return f.read(8)


def _check_entry(path, name, e, data_len):
    if not isinstance(e, dict):
        raise FormatError(f"{path}: entry '{name}' must be an object")
    dt = _DTYPES.get(e.get("dtype"))
    shape, offs = e.get("shape"), e.get("data_offsets")
    if dt is None:
        raise FormatError(f"{path}: tensor '{name}' has dtype {e.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and 0 <= s <= 1 << 40 for s in shape)):
        raise FormatError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise FormatError(f"{path}: tensor '{name}' has invalid data_offsets {offs!r}")
    nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dt).itemsize
    b, e_ = offs
    if not (0 <= b <= e_ <= data_len) or e_ - b != nbytes or b % np.dtype(dt).itemsize:
        raise FormatError(f"{path}: tensor '{name}' of shape {shape} needs {nbytes} bytes, but its "
                          f"offsets {offs} do not fit the {data_len}-byte data section")
    return dt, tuple(shape), b


def _tensor(path, data_start, data, dt, shape, begin):
    """One tensor: from the data we read and checksummed, or memory-mapped (``data`` is None)."""
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dt)
    if data is None:
        # np.asarray: a plain read-only ndarray view of the map (Numba types it like any array)
        return np.asarray(np.memmap(path, dtype=dt, mode="r", offset=data_start + begin, shape=shape))
    a = np.frombuffer(data, dtype=dt, count=count, offset=begin).reshape(shape)
    return a if a.flags.aligned else a.copy()  # kernels are compiled for aligned arrays


def _check_plan(path, meta, fpar, wbuf):
    """Recompute the layout from the stated sizes; refuse any difference."""
    if meta.ndim != 1 or meta.size < lay.M_LD or wbuf.ndim != 1 or fpar.ndim != 1:
        raise FormatError(f"{path}: meta, fpar and wbuf must be 1-D (meta at least {lay.M_LD} long)")
    L, D, I, H, P, n = (int(meta[k]) for k in (lay.M_L, lay.M_D, lay.M_I, lay.M_H, lay.M_P, lay.M_N))
    head_o = int(meta[lay.M_HEAD_O])
    for what, v, lo in (("layers", L, 1), ("input size", I, 1), ("hidden size", H, 1),
                        ("projection", P, 0), ("chunks", n, 1), ("head size", head_o, 0)):
        if not lo <= v <= _MAX_DIM:
            raise FormatError(f"{path}: {what} {v} is outside [{lo}, {_MAX_DIM}]")
    if D not in (1, 2) or n > H or L > 4096:
        raise FormatError(f"{path}: directions {D}, chunks {n} or layers {L} are impossible")
    if meta.size != lay.M_LD + L * D * lay.LD_STRIDE:
        raise FormatError(f"{path}: meta has {meta.size} entries, expected {lay.M_LD + L * D * lay.LD_STRIDE}")
    codes = meta[lay.M_LD:].reshape(L * D, lay.LD_STRIDE)[:, lay.LD_ACT:lay.LD_ACT + 3]
    if np.any(codes < 0) or np.any(codes > 10):
        raise FormatError(f"{path}: activation codes must be 0..10, got {codes.tolist()}")
    flags = {k: int(meta[i]) for k, i in (("has_peep", lay.M_PEEP), ("coupled", lay.M_COUPLED),
                                           ("general", lay.M_GENERAL), ("approx", lay.M_APPROX),
                                           ("reverse", lay.M_REVERSE))}
    if any(v not in (0, 1) for v in flags.values()):
        raise FormatError(f"{path}: flags must be 0 or 1, got {flags}")
    expect_dtype = np.float32 if flags["approx"] else np.float64
    if wbuf.dtype != expect_dtype:
        raise FormatError(f"{path}: wbuf is {wbuf.dtype} but the model says {np.dtype(expect_dtype)}")
    want, total = lay.plan(L, D, I, H, P, n, head_o=head_o, act_codes=codes, **{k: bool(v) for k, v in flags.items()})
    if not np.array_equal(want, meta):
        bad = int(np.flatnonzero(want != meta)[0])
        raise FormatError(f"{path}: layout entry {bad} is {int(meta[bad])}, expected {int(want[bad])} "
                          f"for a model of these sizes")
    if wbuf.size != total:
        raise FormatError(f"{path}: wbuf has {wbuf.size} values, expected {total}")
    if fpar.size != lay.F_LD + L * D * lay.F_STRIDE or not np.all(np.isfinite(fpar)):
        raise FormatError(f"{path}: fpar must hold {lay.F_LD + L * D * lay.F_STRIDE} finite values")
    if not np.all(np.isfinite(wbuf)):
        raise FormatError(f"{path}: weights contain NaN or Inf")


def _check_init(path, meta, dtype, h, c):
    L, D, H, out = int(meta[lay.M_L]), int(meta[lay.M_D]), int(meta[lay.M_H]), int(meta[lay.M_OUT])
    if h is None or c is None:
        raise FormatError(f"{path}: init_h and init_c must both be present or both absent")
    if h.shape != (L * D, out) or c.shape != (L * D, H) or h.dtype != dtype or c.dtype != dtype:
        raise FormatError(f"{path}: initial state must be {np.dtype(dtype)} (L*D, out)=({L * D}, {out}) "
                          f"and (L*D, H)=({L * D}, {H}), got {h.dtype}{h.shape} and {c.dtype}{c.shape}")
    return np.array(h), np.array(c)
