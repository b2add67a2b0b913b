"""``lstm_cpu.load``: recognise a model file's format and hand it to the right reader.

Content first (magic bytes), extension second. This is the only module that sniffs formats: the
importers ask it (``sniff_checkpoint`` for a state-dict file) rather than look at bytes themselves. The ONNX and PyTorch readers live in
``lstm_cpu.importers`` (the repository folder ``importers/``, installed inside our namespace so a
user's own ``importers.py`` cannot shadow it) and are imported only here, when such a file loads.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np

from .errors import FormatError, InputError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # legacy torch.save
_OPTIONS = {
    "packed": {"kernel", "mmap", "weights"},
    "onnx": {"node", "dtype", "weights"},
    "torch": {"prefix", "head", "dtype", "weights"},
    "torchscript": {"prefix", "head", "dtype", "weights"},
    "safetensors": {"prefix", "head", "dtype", "weights"},
}


def is_torchscript(path: str) -> bool:
    """A zip whose records include ``constants.pkl`` or ``code/``: torch.jit.save's layout
    (torch.save's zips hold ``data.pkl`` and ``data/`` only)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except Exception:  # BadZipFile, NotImplementedError (zip version), struct errors, ... (fuzzed)
        return False  # not a readable zip: torch.load reports what is wrong with it


def sniff(path: str) -> str:
    """'packed', 'safetensors', 'torch', 'torchscript' or 'onnx', from the content, then the
    extension."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FormatError(f"cannot read model file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FormatError(f"{path} is {kind}; expected a model file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            if len(head) >= 9:
                n = struct.unpack("<Q", head[:8])[0]
                if head[8:9] == b"{" and 2 <= n <= size - 8:
                    from .packed import is_packed_header, read_header

                    f.seek(0)
                    try:
                        header = read_header(f, size, path)
                    except FormatError:
                        header = {}
                    return "packed" if is_packed_header(header) else "safetensors"
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory, not a model file") from None
    except OSError as e:
        raise FormatError(f"cannot read model file {path}: {e.strerror or e}") from None
    if size == 0:
        raise FormatError(f"{path} is empty")
    if head.startswith(_ZIP_MAGIC) and is_torchscript(path):
        return "torchscript"
    if head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGIC:
        return "torch"
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".bin", ".ckpt"):
        return "torch"
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".lstm", ".lstmcpu", ".packed"):
        return "packed"
    # ONNX has no magic number; a ModelProto starts with field 1 (ir_version, varint): 0x08.
    if ext == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    raise FormatError(f"{path}: unrecognised model format (expected ONNX, PyTorch .pt/.pth, "
                      f".safetensors or an lstm-cpu packed file)")


def sniff_checkpoint(path: str) -> str:
    """"safetensors" | "torchscript" | "pytorch" for a file already known to be a PyTorch
    checkpoint (``load_torch_file``), from its first bytes, then its extension. A missing path
    raises OSError, not FormatError."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        raise  # a missing or unreadable path is not a bad file: keep FileNotFoundError & co.
    if not head:
        raise FormatError(f"{path!r} is empty: expected a .pt/.pth or .safetensors checkpoint")
    # safetensors first: its little-endian u64 header length may well start with 0x80.
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:4] == _ZIP_MAGIC:  # torch.save's zip, or torch.jit.save's
        return "torchscript" if is_torchscript(path) else "pytorch"
    if head[:1] == b"\x80":  # legacy torch.save pickle
        return "pytorch"
    ext = os.path.splitext(path)[1].lower()
    return "safetensors" if ext == ".safetensors" else "pytorch"


def load(path, **options):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InputError(f"path must be a file path, got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    kind = sniff(path)
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise InputError(f"option(s) {sorted(unknown)} do not apply to a {kind} file; "
                         f"expected some of {sorted(_OPTIONS[kind])}")
    options = {k: v for k, v in options.items() if v is not None}
    weights = options.pop("weights", None)
    if weights is not None:
        from .quant import check_format

        check_format(weights)
    model = _load_kind(path, kind, options)
    # no weights=: the file's own format (float, or the int8 of a quantized file) is kept
    return model if weights is None else model.with_weights(weights)


def _load_kind(path, kind, options):
    if kind == "packed":
        from .model import LSTMModel
        from .packed import load as load_packed

        p = load_packed(path, mmap=options.get("mmap", False))
        return LSTMModel._from_packed(p.plan, p.wbuf, p.fpar, p.init, p.source,
                                      options.get("kernel", "auto"), p.weights, p.reduced, p.weight_error)
    if kind == "onnx":
        from lstm_cpu.importers.onnx_lstm import load_onnx
        return load_onnx(path, **options)
    if kind == "torchscript":
        from lstm_cpu.importers.torchscript import load_torchscript

        return load_torchscript(path, **options)
    from lstm_cpu.importers.torch_lstm import load_torch_file

    return load_torch_file(path, **options)


def inspect(path) -> list:
    """Every LSTM in a model file of any format, as :class:`lstm_cpu.candidates.Candidate` records,
    without building a model. ONNX: one per LSTM node or chain (and whatever else the ONNX
    finders recognise); ``.pt``/``.safetensors``: one per state-dict prefix; packed: the model."""
    from .candidates import Candidate

    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InputError(f"path must be a file path, got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    kind = sniff(path)
    if kind == "onnx":
        from lstm_cpu.importers.onnx_lstm import onnx_candidates

        return onnx_candidates(path)
    if kind == "packed":
        from .packed import load as load_packed

        plan = load_packed(path, mmap=True).plan
        return [Candidate("", "operator", plan.I, plan.H, plan.L, plan.D,
                          "lstm-cpu packed model (the whole file)")]
    from lstm_cpu.importers.torch_lstm import candidates

    return candidates(path)


def warmup(verbose=False):
    """Compile every kernel specialisation a model can use (float32 and float64, serial and
    parallel, step, chunk run and whole sequence), so the first real call hits Numba's cache."""
    from .model import LSTMModel
    from .spec import LayerParams

    rng = np.random.default_rng(0)
    done = []
    H, I = 128, 8
    layers = [[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H)), rng.normal(size=4 * H))]]
    for dtype in (np.float32, np.float64):
        m = LSTMModel(layers, dtype=dtype)
        for kernel in ("serial", "parallel"):
            s = m.stream(kernel=kernel)
            s.step(np.zeros(I, dtype))
            s.run(np.zeros((2, I), dtype))
            m.run(np.zeros((2, I), dtype), kernel=kernel)
            done.append(f"{np.dtype(dtype).name}/{kernel}")
            if verbose:
                print("compiled", done[-1])
        # batched streams and sequences (the split kernels from 4 a thread)
        for kernel in ("serial", "parallel"):
            sb = m.stream(batch=8, kernel=kernel)
            sb.step(np.zeros((8, I), dtype))
            sb.run(np.zeros((2, 8, I), dtype))
            m.run(np.zeros((2, 8, I), dtype), kernel=kernel)
        done.append(f"{np.dtype(dtype).name}/batch")
        if verbose:
            print("compiled", done[-1])
    for weights in ("int8", "bfloat16"):  # the reduced step kernels this CPU selects
        s = LSTMModel(layers, weights=weights).stream()
        s.step(np.zeros(I, np.float32))
        s.run(np.zeros((2, I), np.float32))
        done.append(f"{weights}/serial")
        if verbose:
            print("compiled", done[-1])
    return done
