"""TorchScript archives (``torch.jit.save``) -> a flat state dict, without running anything.

An archive is a zip (torch writes every entry uncompressed)::

    <root>/data.pkl        the module tree, pickled (protocol 2) by torch's C++ pickler
    <root>/constants.pkl   a tuple of the values the code calls CONSTANTS.c0, c1, ...
    <root>/data/<key>      one raw storage per record (numel * itemsize bytes) of data.pkl's tensors
    <root>/constants/<key> the same for constants.pkl's tensors
    <root>/byteorder       "little" or "big" (absent: little)
    <root>/code/...        TorchScript source: never read

``torch.jit.load`` would compile and run that code, and a full unpickler would import and call
whatever the pickle names. This reader does neither. It unpickles with the stdlib
:class:`pickle.Unpickler` whose ``find_class`` returns only

* our own stand-ins for a fixed allowlist of torch's rebuild functions (:data:`_ALLOWED`): they
  record a tensor's storage, offset, size and stride (a :class:`_TensorRef`), nothing else;
* inert tokens for ``torch.<X>Storage`` names (not callable);
* for every ``__torch__.*`` class, an inert record class (:class:`_Record`) that can only be
  created by ``NEWOBJ`` and filled by ``BUILD`` (it stores the state; calling it is refused).

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
:class:`FormatError` when the pickle *names* it, so it is never even looked up, let alone called.
Nothing is imported: not torch, not the archive's classes.

Tensors are lazy: the pickle only yields references; a storage record is read, and checked
against the tensor's offset, size and stride, when :func:`load_torchscript` needs that tensor.
The module tree is then flattened into dotted attribute paths (``rnn.weight_ih_l0``, ``fc.bias``:
the names ``state_dict()`` would give) and handed to the state-dict importer
(:mod:`lstm_cpu.importers.torch_lstm`), so ``prefix=`` and ``head=`` work as for ``.pt`` files.
torch is not needed.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError
from lstm_cpu.importers.torch_lstm import _build, _Tensors, _to_numpy

#: Refuse archives with more zip entries than this.
MAX_ENTRIES = 1 << 17
#: Refuse a data.pkl / constants.pkl larger than this (the pickle, not the weights: ~70 bytes a
#: tensor, so room for 200,000 tensors). Unpickled objects take up to ~50x their opcodes' bytes.
MAX_PICKLE_BYTES = 16 << 20
#: Refuse a pickle naming more distinct ``__torch__`` classes than this (each becomes a class).
MAX_CLASSES = 1 << 14
#: Refuse an entry that claims to expand more than this many times (a zip bomb); torch stores
#: entries uncompressed (ratio 1).
MAX_EXPANSION = 100
#: Refuse tensors with more dimensions than this, and object trees deeper than MAX_DEPTH.
MAX_NDIM = 16
MAX_DEPTH = 256

# Storage type name (the pickled global ``torch.<name>``) -> little-endian numpy dtype.
# BFloat16 has no numpy dtype: it is read as uint16 and widened to float32 (its top half).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
_STORAGE_NAME = re.compile(r"[A-Za-z0-9]{1,32}Storage")


# ---------------------------------------------------------------------------------------------
# What the restricted unpickler produces: references and inert records, never live objects
# ---------------------------------------------------------------------------------------------
class _Inert:
    """Base of everything this unpickler creates itself: BUILD on it must not overwrite fields."""

    __slots__ = ()

    def __setstate__(self, state):
        raise FormatError(f"the pickle tries to set the state of a {type(self).__name__}: "
                          "not something torch.jit.save writes")


class _StorageType(_Inert):
    """The pickled global ``torch.FloatStorage`` & co.: a name, not callable."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage(_Inert):
    """A persistent id ``('storage', <type>, key, location, numel)``: the zip record
    ``<root>/<record>``, where record is ``data/<key>`` (or ``constants/<key>`` for constants.pkl)."""

    __slots__ = ("type_name", "record", "numel")

    def __init__(self, type_name: str, record: str, numel: int):
        self.type_name, self.record, self.numel = type_name, record, numel


class _TensorRef(_Inert):
    """A tensor as the pickle describes it: a view (offset, size, stride; in elements) of a
    storage. Nothing is read until :meth:`_Archive.tensor` materialises it."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: Tuple[int, ...], stride: Tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _Opaque(_Inert):
    """A quantized or sparse tensor: kept out of the state dict (the LSTM cannot use it)."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what


class _NoCall(type):
    """Metaclass of the record classes: ``Record(...)`` (pickle's REDUCE/INST/OBJ) is refused;
    ``NEWOBJ`` calls ``cls.__new__`` directly and is the one way to create a record."""

    def __call__(cls, *args, **kwargs):
        raise FormatError(f"the pickle calls class {cls.__qualname__} (REDUCE); TorchScript objects "
                          "are only ever created with NEWOBJ, so this is not a torch.jit.save file")


class _Record(metaclass=_NoCall):
    """An instance of a ``__torch__.*`` class: its type name and the state BUILD gave it
    (for a module, the dict of its attributes: parameters, buffers, submodules, flags)."""

    __slots__ = ("state",)

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state):
        self.state = state


def _ints(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM or not all(
            type(v) is int and v >= 0 for v in value):
        raise FormatError(f"tensor {what}: expected a tuple of at most {MAX_NDIM} non-negative "
                          f"integers, got {type(value).__name__} {str(value)[:80]}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``: a checked reference, no data read.
    (_v2's extra arguments -- requires_grad, backward hooks, metadata -- do not matter here.)"""
    if isinstance(storage, _Opaque):
        return storage
    if not isinstance(storage, _Storage):
        raise FormatError(f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise FormatError(f"_rebuild_tensor_v2: storage offset {storage_offset!r} is not a non-negative integer")
    shape = _ints(size, "size")
    strides = _ints(stride, "stride")
    if len(shape) != len(strides):
        raise FormatError(f"_rebuild_tensor_v2: size {shape} and stride {strides} differ in length")
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, *_ignored):
    """Stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the tensor itself."""
    if not isinstance(data, (_TensorRef, _Opaque)):
        raise FormatError(f"_rebuild_parameter: expected a tensor, got {type(data).__name__}")
    return data


def _opaque(what):
    def rebuild(*_args):
        return _Opaque(what)
    return rebuild


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, dict))):
        raise FormatError("collections.OrderedDict: unexpected arguments in the pickle")
    return collections.OrderedDict(*args)


def _identity(value, *_type_tag):
    """``torch.jit._pickle.restore_type_tag(value, type_str)`` and the legacy ``build_*list``."""
    return value


def _complex(real=0.0, imag=0.0):
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise FormatError("builtins.complex: expected two numbers in the pickle")
    return complex(real, imag)


def _device(spec):
    if not isinstance(spec, str):
        raise FormatError("torch.device: expected a string in the pickle")
    return spec


class _StandIn(_Inert):
    """One allowlisted global, standing in for torch's function of that name. Its own object
    (not a bare function) so that BUILD on it is refused: a pickle cannot set attributes of it."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname, self.fn = qualname, fn

    def __call__(self, *args):
        return self.fn(*args)


#: Every global the pickle may name, mapped to our own inert stand-in. Nothing else is allowed.
_ALLOWED = {key: _StandIn(".".join(key), fn) for key, fn in {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_qtensor"): _opaque("quantized tensor"),
    ("torch._utils", "_rebuild_sparse_tensor"): _opaque("sparse tensor"),
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("builtins", "complex"): _complex,
    ("torch", "device"): _device,
}.items()}

_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")


def _prescan(data: bytes, where: str) -> None:
    """Walk the opcodes (``pickletools.genops`` decodes them; it runs nothing) before unpickling.

    The stdlib unpickler sizes its memo by the largest index a PUT names: ``LONG_BINPUT
    0x08000000`` alone makes it allocate 2 GB. Picklers number memo entries 0, 1, 2, ...; an
    index beyond the count of PUTs so far is refused.
    """
    puts = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _MEMO_PUTS:
                if op.name != "MEMOIZE" and arg > puts:
                    raise FormatError(f"{where}: memo index {arg} at byte {pos} after {puts} memo "
                                      "entries: not a pickler's numbering (a memory bomb)")
                puts += 1
    except FormatError:
        raise
    except Exception as exc:  # ValueError: unknown opcode, truncated argument, ...
        raise FormatError(f"{where} is not a valid TorchScript pickle: {exc}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """The stdlib unpickler with every way to reach a Python object replaced: ``find_class``
    (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) and ``persistent_load`` (PERSID, BINPERSID)."""

    def __init__(self, data: bytes, where: str, folder: str):
        super().__init__(io.BytesIO(data))
        self._where = where
        self._folder = folder  # where this pickle's storages live: "data" or "constants"
        self._storages: Dict[str, _Storage] = {}  # key -> _Storage
        self._classes: Dict[str, type] = {}

    def find_class(self, module, name):
        fn = _ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and _STORAGE_NAME.fullmatch(name):
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            cls = self._classes.get(qual)
            if cls is None:
                if len(self._classes) >= MAX_CLASSES:
                    raise FormatError(f"{self._where}: more than {MAX_CLASSES} distinct TorchScript classes")
                cls = self._classes[qual] = _NoCall(name, (_Record,), {"__slots__": (), "__qualname__": qual})
            return cls
        raise FormatError(
            f"{self._where}: the pickle refers to {module}.{name}, which a TorchScript archive's "
            "weights never need; refused without importing or calling anything")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise FormatError(f"{self._where}: unexpected persistent id {str(pid)[:120]}; expected "
                              "('storage', <torch storage type>, key, location, numel)")
        _, stype, key, _location, numel = pid
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = _Storage(stype.name, f"{self._folder}/{key}", numel)
        elif (known.type_name, known.numel) != (stype.name, numel):
            raise FormatError(f"{self._where}: storage {key!r} is declared twice, as {known.type_name}"
                              f"[{known.numel}] and as {stype.name}[{numel}]")
        return known


# ---------------------------------------------------------------------------------------------
# The archive: bounded zip reading, lazy storages
# ---------------------------------------------------------------------------------------------
def _entries(z: zipfile.ZipFile, path: str, archive_bytes: int) -> Dict[str, zipfile.ZipInfo]:
    """name -> ZipInfo, after the bomb checks: entry count, per-entry expansion, total size."""
    infos = z.infolist()
    if len(infos) > MAX_ENTRIES:
        raise FormatError(f"{path!r}: {len(infos)} zip entries, more than the limit {MAX_ENTRIES}")
    out: Dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        if info.filename in out:
            raise FormatError(f"{path!r}: zip entry {info.filename!r} appears twice")
        if info.file_size > MAX_EXPANSION * info.compress_size + 4096:
            raise FormatError(
                f"{path!r}: zip entry {info.filename!r} claims {info.file_size} bytes from "
                f"{info.compress_size} compressed (more than {MAX_EXPANSION}x): refused as a zip bomb")
        total += info.file_size
        out[info.filename] = info
    if total > MAX_EXPANSION * archive_bytes + 4096 * len(infos):
        raise FormatError(f"{path!r}: its zip entries claim {total} bytes in a {archive_bytes}-byte "
                          "file: refused as a zip bomb")
    return out


class _Archive:
    """An open TorchScript zip: its pickles unpickled (restricted), its storages read on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)  # a missing file keeps its FileNotFoundError
        try:
            self._zip = zipfile.ZipFile(path)
        except Exception as exc:  # BadZipFile, NotImplementedError, OSError from a bad offset, ...
            raise FormatError(f"{path!r} is not a readable TorchScript archive: "
                              f"{type(exc).__name__}: {exc}") from None
        try:
            self._init(size)
        except BaseException:
            self._zip.close()
            raise

    def _init(self, size: int):
        path = self.path
        self._infos = _entries(self._zip, path, size)
        roots = [n[: -len("/data.pkl")] for n in self._infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise FormatError(f"{path!r}: expected exactly one <root>/data.pkl in a TorchScript archive, "
                              f"found {len(roots)}")
        self.root = roots[0]
        order = self._infos.get(f"{self.root}/byteorder")
        order = self._read(order, 16).decode("ascii", "replace").strip() if order else "little"
        if order not in ("little", "big"):
            raise FormatError(f"{path!r}: byteorder record says {order!r}; expected 'little' or 'big'")
        self._order = "<" if order == "little" else ">"
        self._arrays: Dict[str, np.ndarray] = {}  # record -> its storage, read once
        self.data = self._unpickle("data")
        const = f"{self.root}/constants.pkl"
        self.constants = self._unpickle("constants") if const in self._infos else ()

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise FormatError(f"{self.path!r}: entry {info.filename!r} has {info.file_size} bytes, "
                              f"more than the {limit} expected")
        try:
            with self._zip.open(info) as f:
                data = f.read(limit + 1)  # zipfile stops at the declared size and checks the CRC
        except Exception as exc:  # BadZipFile (CRC, truncation), zlib.error, NotImplementedError, ...
            raise FormatError(f"{self.path!r}: entry {info.filename!r} is unreadable: "
                              f"{type(exc).__name__}: {exc}") from None
        if len(data) != info.file_size:
            raise FormatError(f"{self.path!r}: entry {info.filename!r} holds {len(data)} bytes, "
                              f"its header says {info.file_size}")
        return data

    def _unpickle(self, name: str):
        """``<root>/<name>.pkl``, whose storages are the records ``<root>/<name>/<key>``."""
        info = self._infos[f"{self.root}/{name}.pkl"]
        where = f"{self.path!r}: {info.filename}"
        data = self._read(info, MAX_PICKLE_BYTES)
        _prescan(data, where)
        try:
            return _RestrictedUnpickler(data, where, name).load()
        except FormatError:
            raise
        except RecursionError:
            raise FormatError(f"{where}: the pickle nests too deeply") from None
        except Exception as exc:  # UnpicklingError, EOFError, TypeError from a bad REDUCE, ...
            raise FormatError(f"{where} is not a valid TorchScript pickle: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def _storage(self, s: _Storage) -> np.ndarray:
        """The storage's record as a 1-D array of ``s.numel`` elements (read once)."""
        arr = self._arrays.get(s.record)
        if arr is not None:
            return arr
        dt = _STORAGE_DTYPES.get(s.type_name)
        if dt is None:
            raise FormatError(f"{self.path!r}: storage {s.record} is a {s.type_name}, which has no "
                              f"numpy equivalent; expected one of {', '.join(_STORAGE_DTYPES)}")
        dtype = np.dtype(dt).newbyteorder(self._order) if dt[0] == "<" else np.dtype(dt)
        info = self._infos.get(f"{self.root}/{s.record}")
        if info is None:
            raise FormatError(f"{self.path!r}: storage record {self.root}/{s.record} is missing")
        need = s.numel * dtype.itemsize
        if info.file_size < need:
            raise FormatError(f"{self.path!r}: storage record {info.filename} holds {info.file_size} "
                              f"bytes; its {s.type_name} of {s.numel} elements needs {need}")
        raw = self._read(info, info.file_size)[:need]
        arr = np.frombuffer(raw, dtype=dtype)  # (numel,)
        self._arrays[s.record] = arr
        return arr

    def tensor(self, name: str, ref: _TensorRef) -> np.ndarray:
        """Materialise one tensor: its view of the storage, checked, copied, native byte order;
        bfloat16 widened to float32."""
        s = ref.storage
        n = math.prod(ref.shape)  # Python ints: a hostile size cannot overflow
        if n and ref.offset + sum((d - 1) * st for d, st in zip(ref.shape, ref.stride)) >= s.numel:
            raise FormatError(
                f"tensor {name!r}: offset {ref.offset}, size {ref.shape}, stride {ref.stride} reach "
                f"past its storage {s.record} of {s.numel} elements")
        if n > s.numel:
            # A broadcast (stride-0) view would be materialised at its logical size (a bomb).
            raise FormatError(f"tensor {name!r} of shape {ref.shape} has {n} elements but its storage "
                              f"{s.record} holds {s.numel}: broadcast or overlapping views are refused")
        base = self._storage(s)  # (numel,)
        if n == 0:
            out = np.zeros(ref.shape, base.dtype)
        else:
            view = np.lib.stride_tricks.as_strided(
                base[ref.offset:], shape=ref.shape, strides=[st * base.itemsize for st in ref.stride],
                writeable=False)
            out = np.array(view, dtype=base.dtype.newbyteorder("="))  # a C-contiguous copy
        if s.type_name == "BFloat16Storage":  # bf16 is the top half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


# ---------------------------------------------------------------------------------------------
# Flattening the module tree into a state dict
# ---------------------------------------------------------------------------------------------
def _flatten(root, into: Dict[str, object], prefix: str = "") -> None:
    """Every tensor reachable through attribute dicts, by dotted path (``rnn.weight_ih_l0``).

    Modules are records whose state is their attribute dict; a plain dict is walked the same way.
    Lists and tuples are not (``nn.LSTM``'s ``_flat_weights`` repeats its parameters, and
    ``state_dict()`` has no list entries either). Cycles and deep nesting are cut off.
    """
    stack = [(prefix, root, 0)]
    seen = set()
    while stack:
        name, obj, depth = stack.pop()
        if isinstance(obj, (_TensorRef, _Opaque)):
            if name and name not in into:
                into[name] = obj
            continue
        if isinstance(obj, _Record):
            obj = obj.state
        if not isinstance(obj, dict) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth >= MAX_DEPTH:
            raise FormatError(f"the module tree is nested more than {MAX_DEPTH} levels deep at {name!r}")
        for key, value in reversed(list(obj.items())):
            if isinstance(key, str):
                stack.append((f"{name}.{key}" if name else key, value, depth + 1))


def read_state(path: str) -> Tuple[_Archive, Dict[str, _TensorRef]]:
    """Open an archive and list its tensors: (archive, dotted name -> reference). The caller
    closes the archive. ``CONSTANTS.c<i>`` names the tensors of constants.pkl (a frozen module
    keeps its weights there, without their attribute names)."""
    ar = _Archive(path)
    try:
        refs: Dict[str, object] = {}
        _flatten(ar.data, refs)
        if isinstance(ar.constants, (tuple, list)):
            for i, c in enumerate(ar.constants):
                if isinstance(c, _TensorRef):
                    refs.setdefault(f"CONSTANTS.c{i}", c)
        return ar, {k: v for k, v in refs.items() if isinstance(v, _TensorRef)}
    except BaseException:
        ar.close()
        raise


@contextmanager
def tensors(path: str):
    """The archive's tensors as the state-dict importer's ``_Tensors`` (shapes without reading;
    values read, checked and converted by ``load``), valid inside the ``with``."""
    ar, refs = read_state(path)
    with ar:
        if refs and all(n.startswith("CONSTANTS.") for n in refs):
            raise FormatError(
                f"{path!r} is a frozen TorchScript module (torch.jit.freeze): its {len(refs)} tensors "
                "are unnamed constants, so no LSTM can be told apart by name; load the module as "
                "saved before freezing, or its state_dict() saved with torch.save")
        yield _Tensors(list(refs), lambda n: refs[n].shape, lambda n: _to_numpy(n, ar.tensor(n, refs[n])))


def load_torchscript(path, prefix: Optional[str] = None, head=None, dtype=np.float32):
    """A TorchScript archive -> LSTMModel, reading only its weights (see the module docstring).

    ``prefix``/``head`` are module attribute paths, as for a ``.pt`` state dict
    (``prefix="encoder.rnn."``, ``head="fc"``).
    """
    path = os.fspath(path)
    with tensors(path) as ts:
        return _build(ts, prefix, head, dtype, {"format": "torchscript", "path": path})


__all__ = ["load_torchscript", "read_state", "tensors", "MAX_ENTRIES", "MAX_PICKLE_BYTES", "MAX_EXPANSION",
           "MAX_CLASSES"]
