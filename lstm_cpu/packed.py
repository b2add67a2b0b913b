"""lstm-cpu's packed file format: a plan's arrays in a safetensors-layout file, numpy only.

Layout (the safetensors layout, so standard tools can list it)::

    u64 little-endian  header length n
    n bytes            JSON header: {"meta": {...}, "fpar": {...}, "wbuf": {...},
                                     ["init_h": ..., "init_c": ...],
                                     "__metadata__": {"format": "lstm-cpu-packed", "version": "3",
                                                      "sha256": <hex>, "source": <JSON>}}
    data section       the tensors at their "data_offsets" (since lstm-cpu 0.1 each starts on a
                       64-byte boundary of the file, see aligned.py; older files: 8 bytes)

The checksum covers every byte that is read: the length prefix, the header (with the 64 hex
digits of the digest itself read as zeros) and the data section. Swapping two offsets, shapes or
dtypes in the header fails it as surely as a flipped weight. With ``mmap=True`` the file is
mapped once; the bytes hashed are the bytes the arrays view (no second open by path).

Why not pickle or the safetensors package: the runtime must load a model with numpy and numba
only, and never run code from a file. This module reads and writes plain arrays; the plan is
re-derived from the sizes the file states (``layout.Plan.from_meta``) and any difference is
refused before a kernel runs (the kernels do no bounds checks). It knows nothing of
``LSTMModel``: ``model.save`` hands it arrays, ``loader`` builds the model from what it returns.
"""

from __future__ import annotations

import hashlib
import json
import mmap as _mmap
import os
import re
import struct
import tempfile
from typing import NamedTuple, Optional, Tuple

import numpy as np

from . import aligned
from . import layout as lay
from .errors import FormatError, UnsupportedModelError

FORMAT_NAME = "lstm-cpu-packed"
FORMAT_VERSION = 3
#: Format 2 stored each float gate matrix row-major, (K, C); format 3 stores it the way layout 7
#: does, as 64-column panels. load() converts a format-2 file's float gate matrices (a copy,
#: never a map); its reduced files carry no float gate matrix and load unchanged.
ROW_MAJOR_GATES_VERSION = 2
_MAX_HEADER = 1 << 20  # our headers are ~1 KB; anything near this is not ours
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I8": np.int8, "I16": np.int16}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ZERO_DIGEST = "0" * 64
_DIGEST_FIELD = re.compile(rb'"sha256":"([0-9a-f]{64})"')


class Packed(NamedTuple):
    """What a packed file holds, validated: the plan, its buffers and provenance."""

    plan: lay.Plan
    wbuf: np.ndarray  # (plan.total,) float32 or float64, read-only
    fpar: np.ndarray  # (F_LD + L*D*F_STRIDE,) float64
    init: Optional[Tuple[np.ndarray, np.ndarray]]  # (h0 (L*D, out), c0 (L*D, H)) or None
    source: dict
    weights: str = "float32"  # the gate matrices' format (lstm_cpu.quant.FORMATS)
    reduced: Optional[list] = None  # [[quant.ReducedLayer per direction] per layer]
    weight_error: Optional[float] = None  # max abs output error measured at conversion


# Reduced files ("weights" in the metadata is "int8" or "bfloat16") store the gate matrices only
# in their format, per (layer l, direction d): "gates_ih_l_d" (4H, in_l) and "gates_hh_l_d"
# (4H, out) as int8 (or int16 bfloat16 bit patterns), and for int8 "scales_ih_l_d",
# "scales_hh_l_d" (4H,) float32; "wbuf" then holds everything else of the plan's buffer, the gate
# regions cut out (the loader puts back what the reduced weights stand for).
def _gate_regions(plan: lay.Plan):
    """(start, end) of every gate matrix in wbuf, in order."""
    out = []
    for l in range(plan.L):
        for d in range(plan.D):
            r = plan.record(l, d)
            out.append((r.w, r.w + r.K * plan.C))
    return out


def _cut_gates(plan, wbuf):
    keep, prev = [], 0
    for a, b in _gate_regions(plan):
        keep.append(wbuf[prev:a])
        prev = b
    keep.append(wbuf[prev:])
    return np.concatenate(keep)


def _reduced_tensors(reduced):
    out = []
    for l, row in enumerate(reduced):
        for d, q in enumerate(row):
            out += [(f"gates_ih_{l}_{d}", q.w_ih), (f"gates_hh_{l}_{d}", q.w_hh)]
            if q.s_ih is not None:
                out += [(f"scales_ih_{l}_{d}", q.s_ih), (f"scales_hh_{l}_{d}", q.s_hh)]
    return out


def _digest(prefix: bytes, header: bytes, data) -> str:
    """SHA-256 of the length prefix, the header with its digest read as zeros, and the data."""
    m = _DIGEST_FIELD.search(header)
    h = hashlib.sha256(prefix)
    h.update(header[: m.start(1)] + _ZERO_DIGEST.encode() + header[m.end(1):])
    h.update(data)
    return h.hexdigest()


def save(path, plan: lay.Plan, wbuf, fpar, init=None, source=None, weights="float32", reduced=None,
         weight_error=None) -> None:
    """Write a packed model atomically: a temporary file in the same folder, then a rename.
    ``reduced``: a reduced model's gate matrices, stored instead of wbuf's float ones."""
    tensors = [("meta", plan.meta), ("fpar", fpar)]
    if init is not None:
        tensors += [("init_h", init[0]), ("init_c", init[1])]
    if reduced is not None:
        tensors.append(("wbuf", _cut_gates(plan, np.asarray(wbuf))))
        tensors += _reduced_tensors(reduced)
    else:
        tensors.append(("wbuf", wbuf))
    # Each tensor starts on a 64-byte boundary of the file (wbuf: its gate matrices do, at element
    # W_CONSTS), so that a mapped or loaded model's weights sit as aligned.py places them; the
    # gaps are zeros, the last tensor is padded to 8 bytes as in every format-3 file.
    header, blobs, offset = {}, [], 0
    for name, a in tensors:
        a = np.ascontiguousarray(a)
        lead = lay.W_CONSTS * a.itemsize if name == "wbuf" else 0
        gap = (-(offset + lead)) % aligned.WEIGHT_ALIGN
        raw = a.tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset + gap, offset + gap + len(raw)]}
        blobs += [b"\0" * gap, raw]
        offset += gap + len(raw)
    blobs.append(b"\0" * ((-offset) % 8))
    data = b"".join(blobs)
    header["__metadata__"] = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "sha256": _ZERO_DIGEST,
        "source": json.dumps(source or {}, default=str),
    }
    if reduced is not None:
        header["__metadata__"]["weights"] = weights
        header["__metadata__"]["weight_error"] = repr(float(weight_error)) if weight_error is not None else ""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-(8 + len(hb))) % aligned.WEIGHT_ALIGN)  # the data section starts on a boundary
    prefix = struct.pack("<Q", len(hb))
    hb = hb.replace(_ZERO_DIGEST.encode(), _digest(prefix, hb, data).encode(), 1)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lstm-cpu-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
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


def resign(image: bytes) -> bytes:
    """A packed file image with its digest recomputed (for tests that forge headers on purpose);
    an image without a well-formed header digest field comes back unchanged."""
    n = struct.unpack("<Q", image[:8])[0] if len(image) >= 8 else 0
    prefix, hb, data = image[:8], image[8 : 8 + n], image[8 + n:]
    m = _DIGEST_FIELD.search(hb)
    if m is None:
        return image
    return prefix + hb[: m.start(1)] + _digest(prefix, hb, data).encode() + hb[m.end(1):] + data


def parse_header(raw: bytes, path: str) -> dict:
    """Bound-check and parse a safetensors-layout header; FormatError on anything off."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise FormatError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header


def _header_length(prefix: bytes, size: int, path: str) -> int:
    if size < 8 or len(prefix) < 8:
        raise FormatError(f"{path}: file is {size} bytes, too short for a header")
    n = struct.unpack("<Q", prefix[:8])[0]
    if n > _MAX_HEADER or n > size - 8:
        raise FormatError(f"{path}: header length {n} is impossible for a {size}-byte file")
    return n


def read_header(f, size: int, path: str) -> dict:
    """Read the header of an open file (positioned at 0); used by ``loader.sniff`` too."""
    n = _header_length(f.read(8), size, path)
    return parse_header(f.read(n), path)


def is_packed_header(header: dict) -> bool:
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def load(path, mmap=False) -> Packed:
    """Read and validate a packed model; FormatError for anything corrupt, truncated or
    inconsistent, UnsupportedModelError for a format version this lstm-cpu does not read.

    By default the file is read into memory once. ``mmap=True`` maps it instead (no copy, pages
    shared between processes): then the file must not be truncated or rewritten in place while
    the model lives, or the process dies with SIGBUS. ``model.save`` never does that (it writes
    a new file and renames it over the old one).
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"cannot open {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = _header_length(prefix, size, path)
        raw_header = f.read(n)  # the bytes parsed are the bytes hashed
        if len(raw_header) != n:
            raise FormatError(f"{path}: the file changed while it was read (short read)")
        header = parse_header(raw_header, path)
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
        if int(version) < ROW_MAJOR_GATES_VERSION:
            raise UnsupportedModelError(
                f"{path}: packed format version {version} was written by an older lstm-cpu whose "
                f"layout depended on the machine's thread count; convert the source model again "
                f"(lstm-cpu convert SOURCE {os.path.basename(path)})")
        stated = md.get("sha256")
        fields = _DIGEST_FIELD.findall(raw_header)
        if not (isinstance(stated, str) and len(fields) == 1 and fields[0].decode() == stated):
            raise FormatError(f"{path}: the header must carry exactly one 64-hex-digit sha256")
        data_start = 8 + n
        data_len = size - data_start
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _check_entry(path, name, e, data_len)
        for req in ("meta", "fpar", "wbuf"):
            if req not in entries:
                raise FormatError(f"{path}: tensor '{req}' is missing")
        # save() packs the tensors in order, the last padded to 8 bytes: anything after the last
        # one is not ours (and is refused here, before a hash pass over arbitrary trailing data).
        end = max(b + int(np.prod(shp)) * np.dtype(dt).itemsize for dt, shp, b in entries.values())
        if data_len != end + (-end) % 8:
            raise FormatError(f"{path}: the data section is {data_len} bytes but its tensors end at "
                              f"{end}: the file has trailing bytes or is truncated")
        if mmap and data_len > 0:
            try:  # one mapping: hashed below, then viewed by the arrays
                buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise FormatError(f"cannot map {path}: {e}") from None
            data = memoryview(buf)[data_start:]
        else:
            # one read into a 64-byte aligned buffer (aligned.py): the bytes we checksum are the
            # bytes we use, and the tensors keep the file's alignment
            buf = aligned.empty(data_len, np.uint8)
            if f.readinto(memoryview(buf)) != data_len:
                raise FormatError(f"{path}: the file changed while it was read (short read)")
            data, data_start = buf, 0
    digest = _digest(prefix, raw_header, data)
    if digest != stated:
        raise FormatError(f"{path}: checksum mismatch: the file is truncated or was modified "
                          f"(expected sha256 {stated[:16]}..., got {digest[:16]}...)")
    for name, want in (("meta", np.int64), ("fpar", np.float64)):
        if entries[name][0] is not want:
            raise FormatError(f"{path}: tensor '{name}' must be {np.dtype(want).name}, "
                              f"got {np.dtype(entries[name][0]).name}")
    arrays = {name: _tensor(buf, data_start, *e) for name, e in entries.items()}
    meta = np.array(arrays["meta"])  # small; private copies so nothing changes under the kernels
    fpar = np.array(arrays["fpar"])
    wbuf = arrays["wbuf"]
    weights = md.get("weights", "float32")
    reduced = weight_error = None
    if weights != "float32":
        wbuf, reduced, weight_error = _restore_reduced(path, meta, md, weights, wbuf, arrays)
    plan = _check_plan(path, meta, fpar, wbuf)
    if int(version) == ROW_MAJOR_GATES_VERSION and weights == "float32":
        wbuf = _panels_from_rows(plan, wbuf)
    init = None
    if "init_h" in arrays or "init_c" in arrays:
        init = _check_init(path, plan, wbuf.dtype, arrays.get("init_h"), arrays.get("init_c"))
    try:
        source = json.loads(md.get("source", "{}"))
        if not isinstance(source, dict):
            source = {}
    except (TypeError, json.JSONDecodeError):
        source = {}
    source = dict(source, packed_path=path)
    source.setdefault("format", "lstm-cpu-packed")
    return Packed(plan, wbuf, fpar, init, source, weights, reduced, weight_error)


def _panels_from_rows(plan: lay.Plan, wbuf: np.ndarray) -> np.ndarray:
    """A format-2 wbuf, whose gate matrices are row-major (K, C), in layout 7's panels (a copy)."""
    out = np.array(wbuf)
    for a, b in _gate_regions(plan):
        K = (b - a) // plan.C
        out[a:b] = lay.to_panels(np.asarray(wbuf[a:b]).reshape(K, plan.C)).ravel()
    return out


def _restore_reduced(path, meta, md, weights, rest, arrays):
    """A reduced file's wbuf (float32, the gate regions filled with what the reduced weights
    stand for), its ReducedLayers and its stored error; FormatError on anything inconsistent."""
    from . import quant

    if weights not in quant.FORMATS:
        raise FormatError(f"{path}: weights format {weights!r} is not one of {quant.FORMATS}")
    try:
        plan = lay.Plan.from_meta(meta)
    except lay.PlanError as e:
        raise FormatError(f"{path}: {e}") from None
    if not plan.approx:
        raise FormatError(f"{path}: {weights} weights need a float32 model")
    regions = _gate_regions(plan)
    if rest.ndim != 1 or rest.dtype != np.float32 or rest.size != plan.total - sum(b - a for a, b in regions):
        raise FormatError(f"{path}: wbuf of a {weights} file must hold the plan's "
                          f"{plan.total - sum(b - a for a, b in regions)} non-gate float32 values")
    wbuf = np.empty(plan.total, np.float32)
    reduced, prev, src = [], 0, 0
    H = plan.H
    for l in range(plan.L):
        row = []
        for d in range(plan.D):
            a, b = regions[l * plan.D + d]
            wbuf[prev:a] = rest[src : src + a - prev]
            src += a - prev
            prev = b
            kin = plan.input_rows(l)
            want = {f"gates_ih_{l}_{d}": (4 * H, kin), f"gates_hh_{l}_{d}": (4 * H, plan.out)}
            if weights == "int8":
                want.update({f"scales_ih_{l}_{d}": (4 * H,), f"scales_hh_{l}_{d}": (4 * H,)})
            got = {}
            for name, shape in want.items():
                arr = arrays.get(name)
                dt = np.float32 if name.startswith("scales") else (np.int8 if weights == "int8" else np.int16)
                if arr is None or arr.shape != shape or arr.dtype != dt:
                    raise FormatError(f"{path}: tensor {name!r} must be {np.dtype(dt).name} of shape "
                                      f"{list(shape)}, got {None if arr is None else (arr.dtype.name, list(arr.shape))}")
                got[name] = arr
            if weights == "int8":
                s_ih, s_hh = got[f"scales_ih_{l}_{d}"], got[f"scales_hh_{l}_{d}"]
                if not (np.all(np.isfinite(s_ih)) and np.all(s_ih > 0) and np.all(np.isfinite(s_hh)) and np.all(s_hh > 0)):
                    raise FormatError(f"{path}: int8 scales of layer {l}, direction {d} must be finite and > 0")
                q = quant.ReducedLayer("int8", got[f"gates_ih_{l}_{d}"], got[f"gates_hh_{l}_{d}"], s_ih, s_hh)
            else:
                q = quant.ReducedLayer("bfloat16", got[f"gates_ih_{l}_{d}"], got[f"gates_hh_{l}_{d}"])
            wbuf[a:b] = lay.to_panels(quant.fuse_gates(*q.weights()).astype(np.float32)).ravel()  # panels
            row.append(q)
        reduced.append(row)
    wbuf[prev:] = rest[src:]
    try:
        err = md.get("weight_error", "")
        weight_error = float(err) if err else None
    except (TypeError, ValueError):
        raise FormatError(f"{path}: weight_error must be a number, got {md.get('weight_error')!r}") from None
    return wbuf, reduced, weight_error


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


def _tensor(buf, data_start, dt, shape, begin):
    """One tensor, viewing the very buffer (bytes or map) that was checksummed."""
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dt)
    a = np.frombuffer(buf, dtype=dt, count=count, offset=data_start + begin).reshape(shape)
    return a if a.flags.aligned else a.copy()  # kernels are compiled for aligned arrays


def _check_plan(path, meta, fpar, wbuf) -> lay.Plan:
    """Recompute the layout from the stated sizes; refuse any difference."""
    if wbuf.ndim != 1 or fpar.ndim != 1:
        raise FormatError(f"{path}: fpar and wbuf must be 1-D")
    try:
        plan = lay.Plan.from_meta(meta)
    except lay.PlanError as e:
        raise FormatError(f"{path}: {e}") from None
    expect_dtype = np.float32 if plan.approx else np.float64
    if wbuf.dtype != expect_dtype:
        raise FormatError(f"{path}: wbuf is {wbuf.dtype} but the model says {np.dtype(expect_dtype)}")
    if wbuf.size != plan.total:
        raise FormatError(f"{path}: wbuf has {wbuf.size} values, expected {plan.total}")
    n_fpar = lay.F_LD + plan.L * plan.D * lay.F_STRIDE
    if fpar.size != n_fpar or not np.all(np.isfinite(fpar)):
        raise FormatError(f"{path}: fpar must hold {n_fpar} finite values")
    if not np.all(np.isfinite(wbuf)):
        raise FormatError(f"{path}: weights contain NaN or Inf")
    return plan


def _check_init(path, plan, dtype, h, c):
    LD, H, out = plan.L * plan.D, plan.H, plan.out
    if h is None or c is None:
        raise FormatError(f"{path}: init_h and init_c must both be present or both absent")
    if h.shape != (LD, out) or c.shape != (LD, H) or h.dtype != dtype or c.dtype != dtype:
        raise FormatError(f"{path}: initial state must be {np.dtype(dtype)} (L*D, out)=({LD}, {out}) "
                          f"and (L*D, H)=({LD}, {H}), got {h.dtype}{h.shape} and {c.dtype}{c.shape}")
    return np.array(h), np.array(c)
