"""Fuzzing every model loader: a mutated file either loads and runs, or raises an LSTMError.

lstm-cpu loads model files from anywhere inside long-lived services, so a hostile or corrupt file
must never crash the process, hang it, make it allocate without bound, or escape as anything but
an :class:`lstm_cpu.LSTMError`. This module

* builds small seed models of every format in memory (packed ``model.save``, ``.safetensors``,
  ``.pt``, ``.onnx``; fixed seeds, no network),
* mutates them, byte-blind (bit flips, byte and integer overwrites, truncation, insertion,
  deletion, duplicated and swapped ranges) and structure-aware (the safetensors/packed JSON header:
  shapes, data offsets, dtypes, the header length, metadata, swapped and renamed tensors, values;
  packed files re-signed so the checks behind the checksum are reached; ``.pt``: the pickle's
  integers, strings and globals, the zip records, state dicts with wrong shapes, dtypes, strides
  and values; ``.onnx`` through the protobuf API: TensorProto dims / data_type / raw_data /
  external data, every LSTM attribute, nodes, opsets, initializers),
* and loads each file **in a child process** with ``lstm_cpu.load``: a loaded model runs 3 stream
  steps (or ``model.run`` for bidirectional models) and must return arrays of the right shape.

Any other outcome is a failure that names the case, the seed model and the mutation, with a
command that regenerates it. The child runs with ``RLIMIT_AS`` (4 GiB by default) so an unbounded
allocation fails fast instead of exhausting the machine, and with
``faulthandler.dump_traceback_later`` per file so a hang is reported with its stack. A segfault or
abort shows up as the child's exit status; the parent then restarts it after the crashing case so
one crash does not hide the next.

Reproduce a case (the report prints this line)::

    python tests/test_fuzz.py repro --seed 20240611 --case 123

Run a standalone fuzz (``bench/reliability_fuzz.py`` wraps this)::

    python tests/test_fuzz.py run --seed 1 --cases 10000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.packed import resign as resign_packed

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: The suite's seed; override with LSTM_FUZZ_SEED to explore, the report always names the seed.
DEFAULT_SEED = int(os.environ.get("LSTM_FUZZ_SEED", "20240611"))
#: Mutated files per suite run (all formats together), and the time the whole fuzz may take.
SUITE_CASES = int(os.environ.get("LSTM_FUZZ_CASES", "1200"))
SUITE_TIMEOUT_S = 240.0
#: One file (load + 3 steps) may take this long before it counts as a hang.
PER_CASE_TIMEOUT_S = 20.0
#: Address-space limit of the fuzz child: an unbounded allocation fails instead of thrashing.
MEMORY_LIMIT = 4 << 30
#: A file whose load raises the child's peak RSS by more than this (our seeds are a few KB, so no
#: honest mutation needs it) is reported as memory amplification.
MEMORY_FLAG_BYTES = 128 << 20

FORMATS = ("packed", "safetensors", "pt", "onnx")
#: Per-file outcomes that fail the fuzz (the child survives them); crashes and hangs come on top.
CASE_FAILURES = ("escaped", "run_failed", "bad_message", "memory", "generator_error")
EXT = {"packed": ".lstm", "safetensors": ".safetensors", "pt": ".pt", "onnx": ".onnx"}

# Values that break parsers: sign, width and overflow boundaries.
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, -1, -2, 255, 256, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]
INTERESTING_FLOATS = [float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e308, 1e-45,
                      -0.0, 0.0, 1e30, -1e30, 65504.0]


# =============================================================================================
# Known bugs: found by this fuzzer, reported, not fixed yet
# =============================================================================================
# A failure matching one of these is listed but does not fail the per-format tests; each must have
# a minimal repro marked xfail(strict=True), which turns into a failure as soon as the bug is
# fixed: then delete the entry here and the marker there. Empty: every bug found so far is fixed
# (the repros stay below and in test_reliability.py as regression tests).
KNOWN_BUGS: Dict[str, Tuple[Callable[[dict], bool], str]] = {}


def known_bug(f) -> Optional[str]:
    for name, (match, _) in KNOWN_BUGS.items():
        if match(f):
            return name
    return None


# =============================================================================================
# Seed models
# =============================================================================================
@dataclass
class Seed:
    """One valid model file: ``files`` maps a file name in the case folder to its bytes; the
    first entry is the model file that gets loaded. ``obj`` keeps the structured form the
    structure-aware mutators edit (a state dict, an ONNX ModelProto)."""

    fmt: str
    name: str
    files: Dict[str, bytes]
    options: dict = field(default_factory=dict)
    obj: object = None

    @property
    def main(self) -> str:
        return next(iter(self.files))


def _lstm_state_dict(rng, I, H, L=1, bidirectional=False, proj=0, bias=True, prefix=""):
    """A PyTorch-named nn.LSTM state dict of float32 numpy arrays (weights ~U(-0.5, 0.5))."""
    sd = {}
    out = proj or H
    for k in range(L):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            fan_in = I if k == 0 else (2 if bidirectional else 1) * out
            u = lambda *s: rng.uniform(-0.5, 0.5, size=s).astype(np.float32)  # noqa: E731
            sd[f"{prefix}weight_ih_l{k}{sfx}"] = u(4 * H, fan_in)
            sd[f"{prefix}weight_hh_l{k}{sfx}"] = u(4 * H, out)
            if bias:
                sd[f"{prefix}bias_ih_l{k}{sfx}"] = u(4 * H)
                sd[f"{prefix}bias_hh_l{k}{sfx}"] = u(4 * H)
            if proj:
                sd[f"{prefix}weight_hr_l{k}{sfx}"] = u(proj, H)
    return sd


def _cell_state_dict(rng, I, H):
    u = lambda *s: rng.uniform(-0.5, 0.5, size=s).astype(np.float32)  # noqa: E731
    return {"weight_ih": u(4 * H, I), "weight_hh": u(4 * H, H), "bias_ih": u(4 * H), "bias_hh": u(4 * H)}


def _torch_state_dicts(rng):
    """name -> (state dict of numpy float32, load options)."""
    head_sd = _lstm_state_dict(rng, 3, 5, bias=False, prefix="enc.rnn.")
    head_sd["fc.weight"] = rng.uniform(-0.5, 0.5, size=(2, 5)).astype(np.float32)
    head_sd["fc.bias"] = rng.uniform(-0.5, 0.5, size=(2,)).astype(np.float32)
    return {
        "lstm1": (_lstm_state_dict(rng, 3, 5), {}),
        "lstm2bi": (_lstm_state_dict(rng, 3, 4, L=2, bidirectional=True), {}),
        "proj": (_lstm_state_dict(rng, 4, 6, L=2, proj=3), {}),
        "cell": (_cell_state_dict(rng, 3, 5), {}),
        "head_nobias": (head_sd, {"head": "fc"}),
    }


def _torch_bytes(sd, legacy=False) -> bytes:
    import torch

    buf = io.BytesIO()
    td = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
          for k, v in sd.items()}
    torch.save(td, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _safetensors_bytes(sd, metadata=None) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in sd.items()}, metadata=metadata)


def _packed_models(rng):
    """name -> LSTMModel covering every packed feature: peepholes, clip, coupled gates, initial
    state, projection, head, general activations, float64, two directions, several chunks."""
    from lstm_cpu import LayerParams, LSTMModel

    def lp(I, H, out=None, peep=False, proj=0, acts=None):
        out = proj or H if out is None else out
        u = lambda *s: rng.uniform(-0.5, 0.5, size=s)  # noqa: E731
        return LayerParams(u(4 * H, I), u(4 * H, proj or H), u(4 * H), u(proj, H) if proj else None,
                           u(3 * H) if peep else None, acts)

    H = 5
    models = {
        "basic": LSTMModel([[lp(3, H)]]),
        "deep": LSTMModel([[lp(3, H, peep=True)], [lp(H, H, peep=True)]], clip=3.0, input_forget=True,
                          initial_state=(rng.uniform(-1, 1, (2, H)), rng.uniform(-1, 1, (2, H)))),
        "proj_head": LSTMModel([[lp(4, 6, proj=3)], [lp(3, 6, proj=3)]],
                               head=(rng.uniform(-1, 1, (2, 3)), rng.uniform(-1, 1, 2))),
        "general_act": LSTMModel([[lp(3, H, acts=("HardSigmoid", "LeakyRelu", "Softsign"))]]),
        "f64": LSTMModel([[lp(3, H)], [lp(H, H)]], dtype=np.float64),
        "bi": LSTMModel([[lp(3, 4), lp(3, 4)]]),
        "chunks": LSTMModel([[lp(4, 128)]], kernel="parallel"),  # one chunk per thread
    }
    return models


def _onnx_models(rng):
    """name -> (ModelProto, {side file: bytes}). Weights in ONNX layout (gates i, o, f, c)."""
    from onnx import TensorProto, helper, numpy_helper

    def u(*s):
        return rng.uniform(-0.5, 0.5, size=s).astype(np.float32)

    def model(nodes, inits, I, outputs, opset=14, inputs=None):
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I])
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        g = helper.make_graph(nodes, "g", [x] + (inputs or []), outs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m

    I, H = 3, 5
    fwd = model([helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm",
                                  hidden_size=H)],
                {"W": u(1, 4 * H, I), "R": u(1, 4 * H, H), "B": u(1, 8 * H)}, I, ["Y"])
    H2 = 4
    bi = model([helper.make_node("LSTM", ["X", "W", "R", "B", "", "h0", "c0", "P"], ["Y", "Y_h", "Y_c"],
                                 name="lstm_bi", hidden_size=H2, direction="bidirectional")],
               {"W": u(2, 4 * H2, I), "R": u(2, 4 * H2, H2), "B": u(2, 8 * H2), "h0": u(2, 1, H2),
                "c0": u(2, 1, H2), "P": u(2, 3 * H2)}, I, ["Y", "Y_h"])
    acts = model([helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm_acts",
                                   hidden_size=H, clip=2.5,
                                   activations=["HardSigmoid", "ScaledTanh", "LeakyRelu"],
                                   activation_alpha=[0.3, 1.1, 0.02], activation_beta=[0.4, 0.9])],
                 {"W": u(1, 4 * H, I), "R": u(1, 4 * H, H), "B": u(1, 8 * H)}, I, ["Y"])
    const = model([helper.make_node("Constant", [], ["W0"], value=numpy_helper.from_array(u(1, 4 * H, I), "W0")),
                   helper.make_node("Identity", ["W0"], ["W"]),
                   helper.make_node("Constant", [], ["R"], value=numpy_helper.from_array(u(1, 4 * H, H), "R")),
                   helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h", "Y_c"], name="lstm_const",
                                    hidden_size=H)], {}, I, ["Y"])
    # Two LSTM nodes chained through Squeeze (what torch.onnx.export writes for num_layers=2).
    two = model([helper.make_node("LSTM", ["X", "W0", "R0", "B0"], ["Y0", "", ""], name="l0", hidden_size=H),
                 helper.make_node("Squeeze", ["Y0", "axes"], ["X1"]),
                 helper.make_node("LSTM", ["X1", "W1", "R1", "B1"], ["Y", "", ""], name="l1", hidden_size=H)],
                {"W0": u(1, 4 * H, I), "R0": u(1, 4 * H, H), "B0": u(1, 8 * H), "axes": np.array([1], np.int64),
                 "W1": u(1, 4 * H, H), "R1": u(1, 4 * H, H), "B1": u(1, 8 * H)}, I, ["Y"])
    # W in an external data file next to the model.
    ext = model([helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm_ext",
                                  hidden_size=H)],
                {"W": u(1, 4 * H, I), "R": u(1, 4 * H, H), "B": u(1, 8 * H)}, I, ["Y"])
    w = ext.graph.initializer[0]
    blob = bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(blob)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    # The LSTM inside a model-local function, weights passed in from main-graph initializers
    # (torch's export_modules_as_functions): exercises the size-capped inlining.
    fn_body = helper.make_function(
        "local", "LSTMFn", ["x", "w", "r", "b"], ["y"],
        [helper.make_node("LSTM", ["x", "w", "r", "b"], ["y", "", ""], hidden_size=H)],
        [helper.make_opsetid("", 14)])
    func = model([helper.make_node("LSTMFn", ["X", "W", "R", "B"], ["Y"], domain="local", name="call")],
                 {"W": u(1, 4 * H, I), "R": u(1, 4 * H, H), "B": u(1, 8 * H)}, I, ["Y"])
    func.functions.append(fn_body)
    func.opset_import.append(helper.make_opsetid("local", 1))
    # A constant sequence_lens equal to a static T (accepted as a no-op).
    lens = model([helper.make_node("LSTM", ["X", "W", "R", "B", "lens"], ["Y", "Y_h", "Y_c"],
                                   name="lstm_lens", hidden_size=H)],
                 {"W": u(1, 4 * H, I), "R": u(1, 4 * H, H), "B": u(1, 8 * H)}, I, ["Y"])
    lens.graph.initializer.append(numpy_helper.from_array(np.full(2, 4, np.int32), "lens"))
    dims = lens.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 4, 2
    out = {"fwd": (fwd, {}), "bi_peep_state": (bi, {}), "acts_clip": (acts, {}), "constants": (const, {}),
           "two_layer": (two, {}), "external": (ext, {"weights.bin": blob}), "local_function": (func, {}),
           "const_lens": (lens, {})}
    # What importers/onnx_export.py writes (torch.onnx.export's layout): a 2-layer bidirectional
    # chain through Transpose + Reshape, runtime initial states, peepholes, clip.
    try:
        from lstm_cpu.importers.onnx_export import to_onnx
        from lstm_cpu import LayerParams, LSTMModel

        def lp(fan_in, H):
            return LayerParams(rng.uniform(-0.5, 0.5, (4 * H, fan_in)), rng.uniform(-0.5, 0.5, (4 * H, H)),
                               rng.uniform(-0.5, 0.5, 4 * H), None, rng.uniform(-0.5, 0.5, 3 * H))

        out["export_bi2"] = (to_onnx(LSTMModel([[lp(3, 4), lp(3, 4)], [lp(8, 4), lp(8, 4)]], clip=4.0)), {})
    except ImportError:  # the exporter is optional for the fuzz
        pass
    return out


def build_seeds(seed: int) -> Dict[str, List[Seed]]:
    """Every seed model, per format, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, 0xF00D])
    seeds: Dict[str, List[Seed]] = {f: [] for f in FORMATS}
    tmp = tempfile.mkdtemp(prefix="lstm-fuzz-seed-")
    try:
        for name, m in _packed_models(rng).items():
            p = os.path.join(tmp, name + ".lstm")
            m.save(p)
            with open(p, "rb") as f:
                seeds["packed"].append(Seed("packed", name, {"model.lstm": f.read()}))
    finally:
        for fn in os.listdir(tmp):
            os.unlink(os.path.join(tmp, fn))
        os.rmdir(tmp)
    for name, (sd, opts) in _torch_state_dicts(rng).items():
        seeds["safetensors"].append(Seed("safetensors", name, {"model.safetensors": _safetensors_bytes(sd)},
                                         opts, sd))
        seeds["pt"].append(Seed("pt", name, {"model.pt": _torch_bytes(sd)}, opts, sd))
    sd, opts = _torch_state_dicts(rng)["lstm1"]
    seeds["pt"].append(Seed("pt", "lstm1_legacy", {"model.pt": _torch_bytes(sd, legacy=True)}, opts, sd))
    seeds["safetensors"].append(Seed("safetensors", "lstm1_meta",
                                     {"model.safetensors": _safetensors_bytes(sd, {"format": "pt"})}, opts, sd))
    for name, (m, side) in _onnx_models(rng).items():
        seeds["onnx"].append(Seed("onnx", name, {"model.onnx": m.SerializeToString(), **side}, {}, m))
    return seeds


# =============================================================================================
# Byte-level mutations (any format)
# =============================================================================================
def pick(rng, seq):
    """One element of a Python sequence (``rng.choice`` would coerce mixed values to numpy)."""
    return seq[int(rng.integers(0, len(seq)))]


def _pos(rng, n, head=256):
    """A position in [0, n): half the time within the first ``head`` bytes, where headers live."""
    if n <= 0:
        return 0
    if rng.random() < 0.5:
        return int(rng.integers(0, min(n, head)))
    return int(rng.integers(0, n))


def mutate_bytes(rng, data: bytes, head=256) -> Tuple[bytes, str]:
    b = bytearray(data)
    n = len(b)
    kind = pick(rng, ["flip", "flip", "byte", "int", "truncate", "insert", "delete", "dup", "swap", "fill"])
    if n == 0:
        kind = "insert"
    if kind == "flip":
        bits = int(rng.integers(1, 5))
        where = []
        for _ in range(bits):
            p = _pos(rng, n, head)
            bit = int(rng.integers(0, 8))
            b[p] ^= 1 << bit
            where.append(f"{p}.{bit}")
        return bytes(b), f"bitflip[{','.join(where)}]"
    if kind == "byte":
        p = _pos(rng, n, head)
        v = int(pick(rng, [0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))]))
        b[p] = v
        return bytes(b), f"byte[{p}]={v:#04x}"
    if kind == "int":
        width = int(pick(rng, [4, 8]))
        p = _pos(rng, max(1, n - width + 1), head)
        v = int(pick(rng, INTERESTING_INTS))
        raw = (v % (1 << (8 * width))).to_bytes(width, "little")
        b[p:p + width] = raw
        return bytes(b), f"u{8 * width}le[{p}]={v}"
    if kind == "truncate":
        cut = int(pick(rng, [0, 1, 7, 8, 9, n // 2, n - 1, n - 8, int(rng.integers(0, n))]))
        cut = max(0, min(cut, n - 1))
        return bytes(b[:cut]), f"truncate[{cut}/{n}]"
    if kind == "insert":
        p = _pos(rng, n + 1, head)
        k = int(pick(rng, [1, 4, 8, 64]))
        ins = rng.integers(0, 256, size=k, dtype=np.uint8).tobytes()
        return bytes(b[:p]) + ins + bytes(b[p:]), f"insert[{p}]+{k}"
    if kind == "delete":
        p = _pos(rng, n, head)
        k = int(pick(rng, [1, 4, 8, 64, 256]))
        return bytes(b[:p]) + bytes(b[p + k:]), f"delete[{p}:{p + k}]"
    if kind == "dup":
        p = _pos(rng, n, head)
        k = int(pick(rng, [4, 16, 64]))
        q = _pos(rng, n, head)
        return bytes(b[:q]) + bytes(b[p:p + k]) + bytes(b[q:]), f"dup[{p}:{p + k}]->{q}"
    if kind == "swap":
        k = int(pick(rng, [1, 4, 8, 32]))
        if n < 2 * k:
            return bytes(b[::-1]), "reverse"
        p, q = sorted(int(x) for x in rng.integers(0, n - k, size=2))
        if q < p + k:
            q = min(n - k, p + k)
        b[p:p + k], b[q:q + k] = b[q:q + k], b[p:p + k]
        return bytes(b), f"swap[{p}:{p + k}]<->[{q}:{q + k}]"
    p = _pos(rng, n, head)
    k = int(pick(rng, [8, 64, 1024]))
    v = int(pick(rng, [0, 0xFF]))
    b[p:p + k] = bytes([v]) * len(b[p:p + k])
    return bytes(b), f"fill[{p}:{p + k}]={v:#04x}"


# =============================================================================================
# safetensors layout (safetensors files and our packed files)
# =============================================================================================
def split_st(data: bytes) -> Tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_st(header, body: bytes, n_override=None, pad=True) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        hb += b" " * ((-len(hb)) % 8)
    n = len(hb) if n_override is None else n_override
    return struct.pack("<Q", n % (1 << 64)) + hb + body


def _tensor_names(h):
    return [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)]


_ST_DTYPES = ["F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "U64", "BOOL", "F8_E4M3",
              "F8_E5M2", "C64", "XYZ", "", "f32", 5, None]
_BAD_DIMS = [0, 1, -1, 2**24, 2**24 + 1, 2**31, 2**32, 2**40, 2**63, 2**64, 1.5, "3", None, True, [2]]
_ITEM = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}


def _st_entry(rng, h):
    names = _tensor_names(h)
    return names[int(rng.integers(0, len(names)))] if names else None


def mutate_st_header(rng, h: dict, body: bytes, packed: bool):
    """One structured edit of a safetensors-layout header (or its body); returns
    (header or raw header bytes, body, header-length override or None, description)."""
    kinds = ["shape", "shape", "offsets", "offsets", "dtype", "dtype", "hlen", "drop", "dup", "rename",
             "swap_entries", "swap_data", "metadata", "json_text", "body", "value", "consistent_shape",
             "retype", "retype"]
    kind = str(pick(rng, kinds))
    name = _st_entry(rng, h)
    if name is None:
        kind = "metadata"
    e = h.get(name) if name else None
    if kind == "shape":
        shape = list(e.get("shape", []))
        op = pick(rng, ["set", "set", "add", "drop", "empty", "reverse", "type"])
        if op == "set" and shape:
            i = int(rng.integers(0, len(shape)))
            shape[i] = _BAD_DIMS[int(rng.integers(0, len(_BAD_DIMS)))]
        elif op == "add":
            shape.insert(int(rng.integers(0, len(shape) + 1)), int(pick(rng, [1, 2, 0, 2**20])))
        elif op == "drop" and shape:
            shape.pop(int(rng.integers(0, len(shape))))
        elif op == "empty":
            shape = []
        elif op == "reverse":
            shape = shape[::-1]
        else:
            shape = pick(rng, ["5", None, {"a": 1}, 3])
        e["shape"] = shape
        return h, body, None, f"header[{name}].shape={shape!r} ({op})"
    if kind == "consistent_shape":
        # A shape whose byte size still matches the offsets: a semantically wrong but
        # self-consistent tensor (e.g. (4H, I) read as (I, 4H) or flattened).
        shape = list(e.get("shape", []))
        total = int(np.prod(shape)) if shape and all(isinstance(s, int) for s in shape) else 0
        choices = [[total], shape[::-1], [1, total], [total, 1], [total // 2, 2] if total % 2 == 0 else [total]]
        shape = choices[int(rng.integers(0, len(choices)))]
        e["shape"] = shape
        return h, body, None, f"header[{name}].shape={shape} (same size)"
    if kind == "offsets":
        offs = list(e.get("data_offsets", [0, 0]))
        op = pick(rng, ["swap", "shift_b", "shift_e", "shift_both", "neg", "huge", "beyond", "len3", "type",
                        "empty_range"])
        b0, e0 = (offs + [0, 0])[:2]
        if op == "swap":
            offs = [e0, b0]
        elif op == "shift_b":
            offs = [b0 + int(pick(rng, [-8, -4, -1, 1, 4, 8])), e0]
        elif op == "shift_e":
            offs = [b0, e0 + int(pick(rng, [-8, -4, -1, 1, 4, 8]))]
        elif op == "shift_both":
            d = int(pick(rng, [-8, 4, 8]))
            offs = [b0 + d, e0 + d]
        elif op == "neg":
            offs = [-8, e0]
        elif op == "huge":
            v = int(pick(rng, INTERESTING_INTS[10:]))
            offs = [b0, v] if rng.random() < 0.5 else [v, v + (e0 - b0)]
        elif op == "beyond":
            offs = [len(body), len(body) + (e0 - b0)]
        elif op == "len3":
            offs = [b0, e0, e0]
        elif op == "empty_range":
            offs = [b0, b0]
        else:
            offs = pick(rng, ["0,8", None, 7])
        e["data_offsets"] = offs
        return h, body, None, f"header[{name}].data_offsets={offs!r} ({op})"
    if kind == "dtype":
        dt = _ST_DTYPES[int(rng.integers(0, len(_ST_DTYPES)))]
        e["dtype"] = dt
        # Half the time keep the byte size consistent by fixing the shape's first dim.
        old = _ITEM.get(h.get(name, {}).get("dtype"), 4)
        return h, body, None, f"header[{name}].dtype={dt!r} (was {old}-byte)"
    if kind == "retype":
        # A different dtype with the *values* converted and the data section re-laid out: a
        # self-consistent file of the wrong type (an I64 fpar, an F64 meta, an F16 weight...).
        np_of = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1"}
        arrays = {}
        for nm in _tensor_names(h):
            en = h[nm]
            o, dt, shp = en.get("data_offsets"), en.get("dtype"), en.get("shape")
            if dt not in np_of or not isinstance(o, list) or len(o) != 2:
                return h, body, None, "noop"
            arrays[nm] = np.frombuffer(body[o[0]:o[1]], np_of[dt])
        new_dt = pick(rng, [k for k in np_of if k != e.get("dtype")])
        with np.errstate(all="ignore"):
            arrays[name] = arrays[name].astype(np_of[new_dt])
        e["dtype"] = new_dt
        parts, off = [], 0
        for nm, a in arrays.items():
            raw = a.tobytes()
            h[nm]["data_offsets"] = [off, off + len(raw)]
            raw += b"\0" * ((-len(raw)) % 8)
            parts.append(raw)
            off += len(raw)
        return h, b"".join(parts), None, f"retype[{name}]->{new_dt} (values converted)"
    if kind == "hlen":
        raw = json.dumps(h, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        n = len(raw)
        v = int(pick(rng, [0, 1, 2, n - 1, n + 1, n + 8, n - 8, n + len(body), 10**12, 2**63, 2**64 - 1, 1 << 20,
                            (1 << 20) + 1]))
        return raw, body, v, f"header_length={v} (true {n})"
    if kind == "drop":
        del h[name]
        return h, body, None, f"drop[{name}]"
    if kind == "dup":
        new = str(pick(rng, [name + "_copy", "weight_ih_l1", "weight_ih_l0_reverse", "weight_hr_l0",
                              "weight_ih_l99999999", "fc.weight", "init_h", "wbuf2", "module." + name]))
        h[new] = json.loads(json.dumps(e))
        return h, body, None, f"dup[{name}]->{new}"
    if kind == "rename":
        new = str(pick(rng, ["weight_ih_l7", "weight_ih_l99999999", "bias_ih_l0_reverse", "x", "",
                              "weight_hh", "meta", "wbuf", "fpar", "init_c", "weight_hr_l0", "__metadata__"]))
        h[new] = h.pop(name)
        return h, body, None, f"rename[{name}]->{new!r}"
    if kind == "swap_entries":
        other = _st_entry(rng, h)
        h[name], h[other] = h[other], h[name]
        return h, body, None, f"swap_entries[{name}<->{other}]"
    if kind == "swap_data":
        # Exchange the stored values of two tensors of equal byte size (a valid file, wrong
        # weights), or exchange only their offsets when sizes differ.
        names = _tensor_names(h)
        sizes = {}
        for nm in names:
            o = h[nm].get("data_offsets")
            if isinstance(o, list) and len(o) == 2:
                sizes.setdefault(o[1] - o[0], []).append(nm)
        pairs = [v for v in sizes.values() if len(v) >= 2]
        if pairs:
            a, c = pairs[int(rng.integers(0, len(pairs)))][:2]
            oa, oc = h[a]["data_offsets"], h[c]["data_offsets"]
            bb = bytearray(body)
            ta, tc = bytes(bb[oa[0]:oa[1]]), bytes(bb[oc[0]:oc[1]])
            bb[oa[0]:oa[1]], bb[oc[0]:oc[1]] = tc, ta
            return h, bytes(bb), None, f"swap_data[{a}<->{c}]"
        other = _st_entry(rng, h)
        h[name]["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], h[name]["data_offsets"]
        return h, body, None, f"swap_offsets[{name}<->{other}]"
    if kind == "metadata":
        md = h.get("__metadata__")
        if packed and isinstance(md, dict):
            op = str(pick(rng, ["version", "version", "sha", "format", "source", "drop", "type"]))
            if op == "version":
                md["version"] = pick(rng, ["2", "0", "-1", "1.0", "", "99999999999999999999", "1 ", "١", 1, None])
            elif op == "sha":
                md["sha256"] = pick(rng, ["", "00" * 32, None, 5])
            elif op == "format":
                md["format"] = "lstm-cpu-packed2"
            elif op == "source":
                md["source"] = pick(rng, ['{"format": 1}', "[1,2]", "{", '"x"', "null", 5])
            elif op == "drop":
                del h["__metadata__"]
            else:
                h["__metadata__"] = [1, 2]
            return h, body, None, f"metadata.{op}={h.get('__metadata__')!r}"[:200]
        v = pick(rng, ["str", "nonstr", "list", "big"])
        if v == "str":
            h["__metadata__"] = {"format": "pt", "x": "y"}
        elif v == "nonstr":
            h["__metadata__"] = {"format": 5}
        elif v == "list":
            h["__metadata__"] = [1]
        else:
            h["__metadata__"] = {"k%d" % i: "v" * 100 for i in range(200)}
        return h, body, None, f"metadata={v}"
    if kind == "json_text":
        raw = json.dumps(h, separators=(",", ":")).encode()
        op = pick(rng, ["bytes", "bytes", "list", "deep", "deep_obj", "nan", "bignum", "utf8", "dupkey"])
        if op == "bytes":
            raw, d = mutate_bytes(rng, raw, head=len(raw))
            return raw, body, None, f"json_text.{d}"
        if op == "list":
            raw = b"[" + raw + b"]"
        elif op == "deep":
            raw = b"[" * 5000 + b"]" * 5000
        elif op == "deep_obj":  # an object (so it still sniffs as safetensors-layout), nested deep
            raw = b'{"__metadata__":' + b"[" * 5000 + b"]" * 5000 + b"," + raw[1:]
        elif op == "nan":
            raw = raw.replace(b'"shape":[', b'"shape":[NaN,', 1)
        elif op == "bignum":
            raw = raw.replace(b'"shape":[', b'"shape":[1' + b"0" * 400 + b",", 1)
        elif op == "utf8":
            raw = raw[:len(raw) // 2] + b"\xff\xfe" + raw[len(raw) // 2:]
        else:
            raw = raw[:-1] + b',"' + name.encode() + b'":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        return raw, body, None, f"json_text.{op}"
    if kind == "body":
        nb, d = mutate_bytes(rng, body, head=len(body))
        return h, nb, None, f"body.{d}"
    # value: write an extreme float into one tensor's data (NaN/Inf must be refused, huge finite
    # values must load and run)
    o = e.get("data_offsets")
    dt = e.get("dtype")
    if isinstance(o, list) and len(o) == 2 and dt in ("F32", "F64") and o[1] > o[0]:
        size = 4 if dt == "F32" else 8
        k = int(rng.integers(0, (o[1] - o[0]) // size))
        v = float(pick(rng, INTERESTING_FLOATS))
        bb = bytearray(body)
        bb[o[0] + k * size:o[0] + (k + 1) * size] = np.array(v, "<f4" if size == 4 else "<f8").tobytes()
        return h, bytes(bb), None, f"value[{name}][{k}]={v}"
    if isinstance(o, list) and len(o) == 2 and dt == "I64" and o[1] > o[0]:
        # packed meta: a layout integer (sizes, offsets, flags, activation codes)
        k = int(rng.integers(0, (o[1] - o[0]) // 8))
        old = struct.unpack_from("<q", body, o[0] + 8 * k)[0]
        v = int(pick(rng, INTERESTING_INTS + [old + 1, old - 1, old * 2, old + 8]))
        bb = bytearray(body)
        bb[o[0] + 8 * k:o[0] + 8 * k + 8] = struct.pack("<Q", v % (1 << 64))
        return h, bytes(bb), None, f"value[{name}][{k}]={v} (was {old})"
    return h, body, None, "noop"


def mutate_safetensors(rng, seed: Seed) -> Tuple[Dict[str, bytes], str]:
    data = seed.files[seed.main]
    if rng.random() < 0.3:
        nd, d = mutate_bytes(rng, data)
        return {seed.main: nd}, d
    h, body = split_st(data)
    h2, body, n, d = mutate_st_header(rng, h, body, packed=False)
    return {seed.main: join_st(h2, body, n)}, d


def mutate_packed(rng, seed: Seed) -> Tuple[Dict[str, bytes], str]:
    """Header and body edits; 60% of the time the checksum is recomputed afterwards so the
    plan/offset/value checks behind it are exercised, not just the SHA-256."""
    data = seed.files[seed.main]
    resign = rng.random() < 0.6
    if rng.random() < 0.2:
        if resign:
            h, body = split_st(data)
            body, d = mutate_bytes(rng, body, head=len(body))
            return {seed.main: resign_packed(join_st(h, body))}, f"body.{d}+resign"
        nd, d = mutate_bytes(rng, data)
        return {seed.main: nd}, d
    h, body = split_st(data)
    h2, body, n, d = mutate_st_header(rng, h, body, packed=True)
    if resign and isinstance(h2, dict) and isinstance(h2.get("__metadata__"), dict) \
            and isinstance(h2["__metadata__"].get("sha256"), str) and len(h2["__metadata__"]["sha256"]) == 64:
        h2["__metadata__"]["sha256"] = "0" * 64
        return {seed.main: resign_packed(join_st(h2, body, n))}, d + "+resign"
    return {seed.main: join_st(h2, body, n)}, d


# =============================================================================================
# PyTorch .pt (zip of a pickle and raw storages; legacy: one pickle stream)
# =============================================================================================
def _rezip(entries: List[Tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _mutate_pickle(rng, pkl: bytes) -> Tuple[bytes, str]:
    """Edit one opcode argument of a pickle stream, keeping the stream well-formed."""
    import pickletools

    ops = list(pickletools.genops(pkl))
    ints = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BININT1", "BININT2", "BININT", "LONG1")]
    strs = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    globs = [(op, arg, pos) for op, arg, pos in ops if op.name in ("GLOBAL", "STACK_GLOBAL")]
    kind = pick(rng, ["int", "int", "int", "str", "global", "bytes"])
    b = bytearray(pkl)
    if kind == "int" and ints:
        op, arg, pos = ints[int(rng.integers(0, len(ints)))]
        if op.name == "BININT1":
            v = int(pick(rng, [0, 1, 2, 3, 4, 5, 8, 20, 100, 255]))
            b[pos + 1] = v
        elif op.name == "BININT2":
            v = int(pick(rng, [0, 1, 4, 0xFFFF]))
            b[pos + 1:pos + 3] = struct.pack("<H", v)
        elif op.name == "BININT":
            v = int(pick(rng, [0, -1, 1, 2**31 - 1, -(2**31), 2**24]))
            b[pos + 1:pos + 5] = struct.pack("<i", v)
        else:  # LONG1: a long integer -> replace by a huge one of the same length
            n = b[pos + 1]
            v = int(pick(rng, [0, -1, 1])) if n == 0 else None
            b[pos + 2:pos + 2 + n] = bytes([0xFF] * (n - 1) + [0x7F]) if n else b""
            v = v if v is not None else "max"
        return bytes(b), f"pickle.{op.name}@{pos}: {arg}->{v}"
    if kind == "str" and strs:
        op, arg, pos = strs[int(rng.integers(0, len(strs)))]
        new = str(pick(rng, ["weight_ih_l9", "weight_hh_l0", "bias_ih_l0_reverse", "cuda", "meta", "mps",
                              "99", "0", "weight_ih_l99999999", "x" * len(arg), "", "storage", "../x"]))
        enc = new.encode()
        if op.name == "BINUNICODE":
            raw = bytes([0x58]) + struct.pack("<I", len(enc)) + enc
            end = pos + 5 + len(arg.encode())
        else:
            raw = bytes([0x8C, len(enc)]) + enc
            end = pos + 2 + len(arg.encode())
        return bytes(b[:pos]) + raw + bytes(b[end:]), f"pickle.str@{pos}: {arg!r}->{new!r}"
    if kind == "global" and globs:
        op, arg, pos = globs[int(rng.integers(0, len(globs)))]
        if op.name == "GLOBAL":
            new = str(pick(rng, ["os system", "builtins eval", "torch DoubleStorage", "torch HalfStorage",
                                  "torch BoolStorage", "torch LongStorage", "torch BFloat16Storage",
                                  "torch._utils _rebuild_parameter", "torch._utils _rebuild_sparse_tensor",
                                  "collections OrderedDict", "torch._tensor _rebuild_from_type_v2",
                                  "numpy.core.multiarray _reconstruct", "torch ComplexFloatStorage",
                                  "torch._utils _rebuild_qtensor", "torch._utils _rebuild_meta_tensor_no_storage"]))
            end = pkl.index(b"\n", pkl.index(b"\n", pos + 1) + 1) + 1
            raw = b"c" + new.replace(" ", "\n").encode() + b"\n"
            return bytes(b[:pos]) + raw + bytes(b[end:]), f"pickle.GLOBAL@{pos}: {arg!r}->{new!r}"
    nb, d = mutate_bytes(rng, pkl, head=len(pkl))
    return nb, f"pickle.{d}"


def _semantic_state_dict(rng, sd: dict) -> Tuple[dict, str]:
    """A state dict that torch can save but that is wrong for an LSTM in one way."""
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    keys = list(sd)
    k = keys[int(rng.integers(0, len(keys)))]
    t = sd[k]
    kind = str(pick(rng, ["shape", "dtype", "dtype", "value", "missing", "extra", "rename", "swap", "nontensor",
                           "expand", "strided", "scalar", "empty", "nested", "sparse", "requires_grad", "bomb"]))
    if kind == "bomb":
        # Every tensor a stride-0 view of one zero, consistently sized for H = 2048: a ~2 KB file
        # whose tensors claim ~70 MB (the loader must not materialise what the file does not hold).
        H = 2048
        out = {}
        for name, v in sd.items():
            if name.endswith(("weight_hh_l0", "weight_hh")):
                out[name] = torch.zeros(1).expand(4 * H, H)
            elif "weight_ih" in name and name.endswith(("_l0", "weight_ih")):
                out[name] = torch.zeros(1).expand(4 * H, v.shape[1])
            elif "bias" in name and name.endswith(("_l0", "bias_ih", "bias_hh")):
                out[name] = torch.zeros(1).expand(4 * H)
        return out, f"bomb: stride-0 tensors for H={H} ({', '.join(out)})"
    if kind == "shape":
        op = pick(rng, ["T", "flat", "slice", "pad", "unsq"])
        if op == "T" and t.ndim == 2:
            sd[k] = t.T.contiguous()
        elif op == "flat":
            sd[k] = t.reshape(-1)
        elif op == "slice":
            sd[k] = t[: max(0, t.shape[0] - 4)]
        elif op == "pad":
            sd[k] = torch.cat([t, t[:4]])
        else:
            sd[k] = t.unsqueeze(0)
        return sd, f"state[{k}] shape {tuple(t.shape)}->{tuple(sd[k].shape)}"
    if kind == "dtype":
        dt = pick(rng, ["float16", "bfloat16", "float64", "int32", "int64", "bool", "complex64", "uint8",
                         "int8", "float8_e4m3fn"])
        dt = getattr(torch, str(dt), torch.float16)
        sd[k] = t.to(dt)
        return sd, f"state[{k}] dtype->{dt}"
    if kind == "value":
        v = float(pick(rng, INTERESTING_FLOATS))
        t = t.clone()
        t.view(-1)[int(rng.integers(0, t.numel()))] = float(np.float32(v))  # 1e308 -> inf
        sd[k] = t
        return sd, f"state[{k}] value {v}"
    if kind == "missing":
        del sd[k]
        return sd, f"state missing {k}"
    if kind == "extra":
        new = str(pick(rng, ["weight_ih_l5", "weight_hr_l0", "bias_ih_l1_reverse", "gru.weight_ih_l0",
                              "weight_ih_l0_reverse", "other.weight_ih"]))
        sd[new] = t.clone()
        return sd, f"state extra {new}={tuple(t.shape)}"
    if kind == "rename":
        new = str(pick(rng, ["weight_ih_l99999999", "weight_ih_l1", "module." + k, "w", k + "_reverse"]))
        sd[new] = sd.pop(k)
        return sd, f"state rename {k}->{new}"
    if kind == "swap":
        k2 = keys[int(rng.integers(0, len(keys)))]
        sd[k], sd[k2] = sd[k2], sd[k]
        return sd, f"state swap {k}<->{k2}"
    if kind == "nontensor":
        v = pick(rng, ["str", "int", "none", "list", "dict", "tuple"])
        sd[k] = {"str": "weights", "int": 7, "none": None, "list": [1.0, 2.0], "dict": {"a": t},
                 "tuple": (t, t)}[str(v)]
        return sd, f"state[{k}]={v}"
    if kind == "expand":
        # stride-0 views: a few bytes on disk, a large logical tensor when loaded
        big = int(pick(rng, [1 << 10, 1 << 14, 1 << 18]))
        H4 = t.shape[0] if t.ndim else 4
        sd[k] = torch.zeros(1).expand(H4, big) if t.ndim == 2 else torch.zeros(1).expand(big)
        return sd, f"state[{k}] expand->{tuple(sd[k].shape)} (stride 0)"
    if kind == "strided":
        sd[k] = t.T.contiguous().T if t.ndim == 2 else t.repeat(2)[::2]
        return sd, f"state[{k}] non-contiguous stride {sd[k].stride()}"
    if kind == "scalar":
        sd[k] = torch.tensor(1.0)
        return sd, f"state[{k}] 0-d"
    if kind == "empty":
        sd[k] = torch.zeros((0,) + tuple(t.shape[1:]))
        return sd, f"state[{k}] empty {tuple(sd[k].shape)}"
    if kind == "nested":
        return {"state_dict": sd, "epoch": 3}, "nested under state_dict"
    if kind == "sparse" and t.ndim == 2:
        sd[k] = t.to_sparse()
        return sd, f"state[{k}] sparse"
    sd[k] = torch.nn.Parameter(t, requires_grad=True)
    return sd, f"state[{k}] Parameter"


def mutate_pt(rng, seed: Seed) -> Tuple[Dict[str, bytes], str]:
    data = seed.files[seed.main]
    legacy = not data.startswith(b"PK")
    kind = str(pick(rng, ["bytes", "pickle", "pickle", "pickle", "record", "zipmeta", "semantic", "semantic",
                           "semantic", "hostile"]))
    if legacy and kind in ("pickle", "record", "zipmeta"):
        kind = "bytes"
    if kind == "bytes":
        nd, d = mutate_bytes(rng, data)
        return {seed.main: nd}, d
    if kind == "semantic":
        sd, d = _semantic_state_dict(rng, seed.obj)
        return {seed.main: _torch_bytes(sd)}, d
    if kind == "hostile":
        return {seed.main: _hostile_pickle(rng)}, "hostile pickle"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    names = [n for n, _ in entries]
    if kind == "pickle":
        i = next(j for j, n in enumerate(names) if n.endswith("data.pkl"))
        pkl, d = _mutate_pickle(rng, entries[i][1])
        entries[i] = (entries[i][0], pkl)
        return {seed.main: _rezip(entries)}, d
    if kind == "record":
        recs = [j for j, n in enumerate(names) if "/data/" in n]
        j = recs[int(rng.integers(0, len(recs)))]
        nm, raw = entries[j]
        op = str(pick(rng, ["truncate", "extend", "drop", "swap", "empty", "nan"]))
        if op == "truncate":
            entries[j] = (nm, raw[: len(raw) // 2])
        elif op == "extend":
            entries[j] = (nm, raw + raw)
        elif op == "drop":
            del entries[j]
        elif op == "swap":
            j2 = recs[int(rng.integers(0, len(recs)))]
            entries[j], entries[j2] = (nm, entries[j2][1]), (entries[j2][0], raw)
        elif op == "empty":
            entries[j] = (nm, b"")
        else:
            entries[j] = (nm, np.full(len(raw) // 4, np.nan, np.float32).tobytes())
        return {seed.main: _rezip(entries)}, f"record[{nm}].{op}"
    op = str(pick(rng, ["byteorder", "version", "drop_version", "drop_pkl", "dup_pkl", "rename_dir"]))
    if op == "byteorder":
        entries = [(n, b"big" if n.endswith("byteorder") else v) for n, v in entries]
    elif op == "version":
        v = str(pick(rng, ["99", "0", "x", "-1", "1" * 40]))
        entries = [(n, v.encode() if n.endswith("/version") else d) for n, d in entries]
    elif op == "drop_version":
        entries = [(n, d) for n, d in entries if not n.endswith("/version")]
    elif op == "drop_pkl":
        entries = [(n, d) for n, d in entries if not n.endswith("data.pkl")]
    elif op == "dup_pkl":
        entries = entries + [(n, d) for n, d in entries if n.endswith("data.pkl")]
    else:
        entries = [(n.replace("model/", "../", 1) if n.startswith("model/") else "../" + n, d) for n, d in entries]
    return {seed.main: _rezip(entries)}, f"zip.{op}"


class _Hostile:
    """Pickles to a call of os.system: what a weights-only loader must refuse."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _hostile_pickle(rng) -> bytes:
    import pickle

    import torch

    buf = io.BytesIO()
    # The command is harmless (it only touches /dev/null) and must never run anyway.
    payload = {"weight_ih_l0": torch.zeros(20, 3), "evil": _Hostile("true > /dev/null")}
    if rng.random() < 0.5:
        torch.save(payload, buf)
    else:
        pickle.dump(payload, buf, protocol=2)
    return buf.getvalue()


# =============================================================================================
# ONNX (through the protobuf API, then serialised)
# =============================================================================================
_ONNX_TYPES = [0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 21, 23, 999]


def mutate_onnx(rng, seed: Seed) -> Tuple[Dict[str, bytes], str]:
    import onnx
    from onnx import AttributeProto, TensorProto, helper

    files = dict(seed.files)
    if rng.random() < 0.15:
        nd, d = mutate_bytes(rng, files[seed.main])
        files[seed.main] = nd
        return files, d
    m = onnx.ModelProto()
    m.CopyFrom(seed.obj)
    g = m.graph
    tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.type == AttributeProto.TENSOR]
    # LSTM nodes of the main graph, else of the model-local functions (the local_function seed)
    lstms = [n for n in g.node if n.op_type == "LSTM"] or [n for f in m.functions for n in f.node
                                                           if n.op_type == "LSTM"]
    node = lstms[int(rng.integers(0, len(lstms)))]
    kind = str(pick(rng, ["dims", "dims", "dtype", "raw", "raw", "external", "attr", "attr", "attr", "node",
                           "opset", "graph", "subgraph"]))
    d = kind
    if kind in ("dims", "dtype", "raw", "external") and not tensors:
        kind = "attr"
    if kind in ("dims", "dtype", "raw", "external"):
        t = tensors[int(rng.integers(0, len(tensors)))]
        tname = t.name or "<const>"
    if kind == "dims":
        op = str(pick(rng, ["set", "add", "drop", "swap", "clear"]))
        dims = list(t.dims)
        if op == "set" and dims:
            dims[int(rng.integers(0, len(dims)))] = int(pick(rng, 
                [0, -1, 1, 2, 2**24 + 1, 2**31, 2**40, 2**62, -(2**63), 2**63 - 1, dims[-1] + 1]))
        elif op == "add":
            dims.insert(int(rng.integers(0, len(dims) + 1)), int(pick(rng, [1, 2, 0])))
        elif op == "drop" and dims:
            dims.pop(int(rng.integers(0, len(dims))))
        elif op == "swap" and len(dims) >= 2:
            dims[-1], dims[-2] = dims[-2], dims[-1]
        else:
            dims = []
        del t.dims[:]
        t.dims.extend(dims)
        d = f"tensor[{tname}].dims={dims} ({op})"
    elif kind == "dtype":
        dt = int(pick(rng, _ONNX_TYPES))
        t.data_type = dt
        d = f"tensor[{tname}].data_type={dt}"
    elif kind == "raw":
        op = str(pick(rng, ["truncate", "extend", "empty", "nan", "big", "to_float_data", "both", "to_int32"]))
        raw = bytes(t.raw_data)
        if op == "truncate":
            t.raw_data = raw[: len(raw) // 2]
        elif op == "extend":
            t.raw_data = raw + raw[:4]
        elif op == "empty":
            t.ClearField("raw_data")
        elif op in ("nan", "big"):
            a = np.frombuffer(raw, np.float32).copy() if len(raw) % 4 == 0 and raw else np.zeros(1, np.float32)
            a[int(rng.integers(0, a.size))] = np.nan if op == "nan" else np.float32(3e38)
            t.raw_data = a.tobytes()
        elif op == "to_float_data":
            a = np.frombuffer(raw, np.float32) if len(raw) % 4 == 0 else np.zeros(3, np.float32)
            t.ClearField("raw_data")
            t.float_data.extend(a[: max(0, a.size - int(pick(rng, [0, 1])))].tolist())
        elif op == "both":
            t.float_data.extend([1.0, 2.0])
        else:
            t.ClearField("raw_data")
            t.int32_data.extend([1, 2, 3])
        d = f"tensor[{tname}].raw_data {op}"
    elif kind == "external":
        raw = bytes(t.raw_data) if t.HasField("raw_data") else b"\0" * 16
        loc = str(pick(rng, ["w.bin", "../outside.bin", "/etc/hostname", "sub/../../outside.bin", "link.bin",
                              "missing.bin", "", "w.bin\x00x", ".", "sub", "C:\\x.bin", "./w.bin"]))
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        off = int(pick(rng, [0, 0, 0, 4, -1, 2**40, len(raw)]))
        length = pick(rng, [len(raw), len(raw), len(raw) + 4, 0, -5, 2**62, None])
        for k, v in (("location", loc), ("offset", str(off)), ("length", None if length is None else str(length))):
            if v is None:
                continue
            e = t.external_data.add()
            e.key, e.value = k, v
        if rng.random() < 0.3:
            e = t.external_data.add()
            e.key, e.value = "offset", "abc"
        files["w.bin"] = b"\0" * max(0, off if 0 <= off < 64 else 0) + raw
        files["__symlink__link.bin"] = b"../outside.bin"
        files["__symlink__sub"] = b".."
        d = f"tensor[{tname}] external location={loc!r} offset={off} length={length}"
    elif kind == "attr":
        attrs = {a.name: a for a in node.attribute}
        name = str(pick(rng, ["hidden_size", "hidden_size", "direction", "activations", "activation_alpha",
                               "activation_beta", "clip", "input_forget", "layout", "unknown", "drop", "retype",
                               "output_sequence"]))
        if name == "drop" and attrs:
            victim = list(attrs)[int(rng.integers(0, len(attrs)))]
            node.attribute.remove(attrs[victim])
            d = f"node[{node.name}] drop attribute {victim}"
        elif name == "retype" and attrs:
            a = list(attrs.values())[int(rng.integers(0, len(attrs)))]
            new = pick(rng, [helper.make_attribute(a.name, 1.5), helper.make_attribute(a.name, "x"),
                              helper.make_attribute(a.name, [1, 2]), helper.make_attribute(a.name, ["a", "b"]),
                              helper.make_attribute(a.name, [0.5, 0.25])])
            a.CopyFrom(new)
            d = f"node[{node.name}].{a.name} retyped to {AttributeProto.AttributeType.Name(a.type)}"
        else:
            values = {
                "hidden_size": [0, -1, 1, 2**31, 2**31 - 1, 2**62, 2**24 + 1, 4, 6, 10, 2**16],
                "direction": ["sideways", "bidirectional", "reverse", "Forward", "", "forward\x00"],
                "activations": [["Foo", "Tanh", "Tanh"], ["Sigmoid", "Tanh"], ["sigmoid", "tanh", "tanh"],
                                ["Relu"] * 6, [], ["Affine", "Elu", "Softplus"], ["ThresholdedRelu"] * 3],
                "activation_alpha": [[float("nan")] * 3, [1e38] * 3, [], [float("inf")], [0.1] * 50],
                "activation_beta": [[float("nan")] * 3, [-1e38] * 2, []],
                "clip": [-1.0, 0.0, float("nan"), float("inf"), 1e-30, 1e38],
                "input_forget": [2, -1, 1, 2**40],
                "layout": [1, 2, -1, 5],
                "unknown": ["x"],
                "output_sequence": [1, 0, 7],
            }
            vals = values.get(name, [1])
            v = vals[int(rng.integers(0, len(vals)))]
            if name in attrs:
                node.attribute.remove(attrs[name])
            attr_name = "mystery_attr" if name == "unknown" else name
            if isinstance(v, list) and not v:
                a = AttributeProto(name=attr_name, type=AttributeProto.STRINGS if name == "activations"
                                   else AttributeProto.FLOATS)
                node.attribute.append(a)
            else:
                node.attribute.append(helper.make_attribute(attr_name, v))
            d = f"node[{node.name}].{attr_name}={v!r}"[:200]
    elif kind == "node":
        op = str(pick(rng, ["op_type", "domain", "dangling", "drop_inputs", "extra_inputs", "empty_x",
                             "duplicate", "remove_other", "no_outputs", "self_loop"]))
        if op == "op_type":
            node.op_type = str(pick(rng, ["GRU", "RNN", "Lstm", "LSTM2", ""]))
        elif op == "domain":
            node.domain = str(pick(rng, ["com.microsoft", "ai.onnx.ml", "x"]))
        elif op == "dangling":
            k = int(rng.integers(0, len(node.input)))
            node.input[k] = "nowhere"
        elif op == "drop_inputs":
            del node.input[int(rng.integers(1, 3)):]
        elif op == "extra_inputs":
            node.input.extend(["W"] * int(pick(rng, [1, 5, 10])))
        elif op == "empty_x":
            node.input[0] = ""
        elif op == "duplicate":
            n2 = g.node.add()
            n2.CopyFrom(node)
            n2.name = node.name + "_dup"
        elif op == "remove_other":
            others = [n for n in g.node if n is not node]
            if others:
                g.node.remove(others[int(rng.integers(0, len(others)))])
        elif op == "no_outputs":
            del node.output[:]
        else:
            if len(node.input) > 1 and node.output:
                node.input[1] = node.output[0]  # W computed by the node itself: a cycle
        d = f"node[{node.name}] {op}"
    elif kind == "opset":
        op = str(pick(rng, ["version", "version", "drop", "domain", "ir"]))
        if op == "version":
            v = int(pick(rng, [0, 1, 6, 7, 13, 21, 22, 23, 999, -1, 2**62]))
            m.opset_import[0].version = v
            d = f"opset={v}"
        elif op == "drop":
            del m.opset_import[:]
            d = "no opset_import"
        elif op == "domain":
            m.opset_import[0].domain = "com.microsoft"
            d = "opset domain com.microsoft"
        else:
            v = int(pick(rng, [0, 1, 3, 99, -1]))
            m.ir_version = v
            d = f"ir_version={v}"
    elif kind == "graph":
        op = str(pick(rng, ["drop_init", "dup_init", "swap_names", "input_weight", "sparse", "rename_init"]))
        inits = list(g.initializer)
        if op == "drop_init" and inits:
            g.initializer.remove(inits[int(rng.integers(0, len(inits)))])
        elif op == "dup_init" and inits:
            t2 = g.initializer.add()
            t2.CopyFrom(inits[0])
            t2.raw_data = bytes(t2.raw_data)[:4]
        elif op == "swap_names" and len(inits) >= 2:
            i, j = rng.choice(len(inits), size=2, replace=False)
            inits[i].name, inits[j].name = inits[j].name, inits[i].name
        elif op == "input_weight" and inits:
            g.input.append(helper.make_tensor_value_info(inits[0].name, TensorProto.FLOAT, list(inits[0].dims)))
        elif op == "sparse" and inits:
            sp = m.graph.sparse_initializer.add()
            sp.values.CopyFrom(inits[0])
            sp.values.name = inits[0].name
            sp.dims.extend(inits[0].dims)
            g.initializer.remove(inits[0])
        elif inits:
            inits[0].name = ""
        d = f"graph {op}"
    else:
        # the LSTM moved into an If branch, or a deep chain of Identity nodes in front of W
        op = str(pick(rng, ["if", "identity_chain", "cast"]))
        if op == "if":
            branch = helper.make_graph([n for n in g.node], "then", [], [helper.make_tensor_value_info(
                "Y", TensorProto.FLOAT, None)])
            cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
            if_node = helper.make_node("If", ["cond"], ["Yif"], then_branch=branch, else_branch=branch)
            del g.node[:]
            g.node.append(if_node)
            g.input.append(cond)
        elif op == "identity_chain":
            w = node.input[1]
            prev = w
            for k in range(int(pick(rng, [3, 300]))):
                n = g.node.add()
                n.op_type, n.input[:], n.output[:] = "Identity", [prev], [f"id{k}"]
                prev = f"id{k}"
            node.input[1] = prev
        else:
            n = g.node.add()
            to = int(pick(rng, [1, 10, 11, 16, 7, 9, 0]))
            n.CopyFrom(helper.make_node("Cast", [node.input[1]], ["Wcast"], to=to))
            node.input[1] = "Wcast"
        d = f"subgraph {op}"
    try:
        files[seed.main] = m.SerializeToString()
    except Exception as exc:  # e.g. protobuf refusing a value: keep the seed, note it
        d += f" (serialise failed: {type(exc).__name__})"
    if rng.random() < 0.1:
        nd, d2 = mutate_bytes(rng, files[seed.main])
        files[seed.main] = nd
        d += " + " + d2
    return files, d


MUTATORS: Dict[str, Callable] = {"packed": mutate_packed, "safetensors": mutate_safetensors, "pt": mutate_pt,
                                 "onnx": mutate_onnx}


# =============================================================================================
# One case: generate, write, load, exercise
# =============================================================================================
def make_case(seeds, seed: int, case: int):
    """(format, seed model, {file: bytes}, description) of case ``case``: a pure function of
    (seed, case), so any case can be regenerated alone."""
    rng = np.random.default_rng([seed, case])
    fmt = FORMATS[case % len(FORMATS)]
    pool = seeds[fmt]
    sm = pool[int(rng.integers(0, len(pool)))]
    files, desc = MUTATORS[fmt](rng, sm)
    if rng.random() < 0.1 and fmt != "onnx":  # stack a byte-level mutation on a structured one
        files[sm.main], d2 = mutate_bytes(rng, files[sm.main])
        desc += " + " + d2
    return fmt, sm, files, desc


def write_case(folder: str, files: Dict[str, bytes], outside: str) -> str:
    """Write the case's files into ``folder`` (emptied first); returns the model file's path."""
    os.makedirs(folder, exist_ok=True)
    for fn in os.listdir(folder):
        p = os.path.join(folder, fn)
        if os.path.islink(p) or os.path.isfile(p):
            os.unlink(p)
    main = None
    for name, data in files.items():
        if name.startswith("__symlink__"):
            target = data.decode()
            os.symlink(os.path.join(folder, target) if target != ".." else os.path.dirname(folder),
                       os.path.join(folder, name[len("__symlink__"):]))
            continue
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        main = main or name
    with open(outside, "wb") as f:  # the file a path escape would reach
        f.write(b"SECRET" * 8)
    return os.path.join(folder, main)


def exercise(model, rng) -> str:
    """Run a loaded model: 3 stream steps (unidirectional) and a 3-step model.run; check shapes.

    Returns "ran" or "ran:nonfinite" (finite weights and inputs may still overflow, e.g. weights
    near float32's max: the NaN policy is to propagate, never to crash)."""
    info = model.info()
    assert isinstance(info, dict) and info["output_size"] == model.output_size
    x = rng.standard_normal((3, model.input_size)).astype(model.dtype)  # (T, I)
    ys = []
    if model.num_directions == 1 and not getattr(model, "reverse", False):
        s = model.stream()
        for t in range(3):
            y = s.step(x[t])
            assert y.shape == (model.output_size,), f"step returned shape {y.shape}"
            ys.append(y)
    y, (h, c) = model.run(x)
    assert y.shape == (3, model.output_size), f"run returned shape {y.shape}"
    L, D = model.num_layers, model.num_directions
    assert h.shape[0] == L * D and c.shape == (L * D, model.hidden_size), f"state shapes {h.shape} {c.shape}"
    finite = all(np.all(np.isfinite(a)) for a in ys + [y])
    return "ran" if finite else "ran:nonfinite"


def repro_command(seed, case):
    return f"python tests/test_fuzz.py repro --seed {seed} --case {case}"


# =============================================================================================
# The child: runs cases in-process, one JSON line per event
# =============================================================================================
def child_main(args) -> int:
    import faulthandler
    import resource

    if args.mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (args.mem_limit, args.mem_limit))
    faulthandler.enable()
    import lstm_cpu
    from lstm_cpu import LSTMError

    log = open(args.progress, "a", buffering=1)

    def emit(**kw):
        log.write(json.dumps(kw, default=str) + "\n")
        log.flush()

    t0 = time.perf_counter()
    faulthandler.dump_traceback_later(600, exit=True)  # seeds + Numba cache loads
    seeds = build_seeds(args.seed)
    work = args.workdir
    outside = os.path.join(work, "outside.bin")
    case_dir = os.path.join(work, "model")  # so "../outside.bin" from the model is ``outside``
    # Warm-up: every seed must load and run unmutated (and this compiles what the cases use).
    if args.start == 0:
        for fmt in FORMATS:
            for sm in seeds[fmt]:
                path = write_case(case_dir, sm.files, outside)
                try:
                    m = lstm_cpu.load(path, **sm.options)
                    exercise(m, np.random.default_rng(0))
                    for k in ("serial", "parallel"):
                        if m.num_directions == 1:
                            m.stream(kernel=k).step(np.zeros(m.input_size, m.dtype))
                except Exception as exc:
                    emit(event="seed_error", fmt=fmt, seed_model=sm.name, exc=f"{type(exc).__name__}: {exc}")
    faulthandler.cancel_dump_traceback_later()
    emit(event="ready", seconds=time.perf_counter() - t0)
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for case in range(args.start, args.stop):
        faulthandler.dump_traceback_later(args.per_case_timeout, exit=True)
        rng_run = np.random.default_rng([args.seed, case, 1])
        try:
            fmt, sm, files, desc = make_case(seeds, args.seed, case)
        except Exception as exc:
            emit(event="end", case=case, fmt=FORMATS[case % len(FORMATS)], outcome="generator_error",
                 exc=f"{type(exc).__name__}: {exc}",
                 tb=traceback.format_exc()[-2000:])
            continue
        emit(event="start", case=case, fmt=fmt, seed_model=sm.name, mutation=desc)
        path = write_case(case_dir, files, outside)
        t = time.perf_counter()
        outcome, extra = None, {}
        try:
            model = lstm_cpu.load(path, **sm.options)
        except LSTMError as exc:
            outcome = "refused:" + type(exc).__name__
            if not str(exc):
                outcome, extra = "bad_message", {"exc": f"{type(exc).__name__} with an empty message"}
        except BaseException as exc:  # anything else escaping is the bug we are looking for
            outcome = "escaped"
            extra = {"exc": f"{type(exc).__name__}: {str(exc)[:500]}", "tb": traceback.format_exc()[-3000:]}
        else:
            try:
                outcome = exercise(model, rng_run)
            except BaseException as exc:
                outcome = "run_failed"
                extra = {"exc": f"{type(exc).__name__}: {str(exc)[:500]}", "tb": traceback.format_exc()[-3000:]}
            del model
        dt = time.perf_counter() - t
        faulthandler.cancel_dump_traceback_later()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        nbytes = sum(len(v) for v in files.values())
        if peak - base_peak > MEMORY_FLAG_BYTES and outcome not in ("escaped", "run_failed"):
            # ru_maxrss only rises: the first case that pushes the peak this far is reported.
            outcome, extra = "memory", {"exc": f"peak RSS grew by {(peak - base_peak) >> 20} MB while loading "
                                               f"a {nbytes}-byte file (outcome {outcome})"}
        base_peak = max(base_peak, peak)
        if outside_touched(outside):
            outcome, extra = "escaped", {"exc": "the file outside the model folder was modified"}
        if outcome in CASE_FAILURES and args.keep:
            keep = os.path.join(args.keep, f"case{case}")
            write_case(keep, files, os.path.join(args.keep, "outside.bin"))
            extra["kept"] = keep
        emit(event="end", case=case, fmt=fmt, outcome=outcome, seconds=round(dt, 4), **extra)
    emit(event="done", maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         seconds=time.perf_counter() - t0)
    return 0


def outside_touched(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() != b"SECRET" * 8
    except OSError:
        return True


# =============================================================================================
# The parent: supervise the child, restart after a crash, aggregate
# =============================================================================================
@dataclass
class FuzzReport:
    seed: int
    cases: int
    outcomes: Counter = field(default_factory=Counter)  # (fmt, outcome) -> count
    failures: List[dict] = field(default_factory=list)  # escaped / run_failed / crash / hang
    seed_errors: List[dict] = field(default_factory=list)
    slowest: List[Tuple[float, int, str]] = field(default_factory=list)
    seconds: float = 0.0
    maxrss_mb: float = 0.0
    restarts: int = 0
    done: int = 0

    def by_format(self) -> Dict[str, Counter]:
        out: Dict[str, Counter] = {}
        for (fmt, oc), n in self.outcomes.items():
            out.setdefault(fmt, Counter())[oc] += n
        return out

    def describe_failures(self, limit=20) -> str:
        lines = []
        for f in self.failures[:limit]:
            lines.append(f"- case {f.get('case')} [{f.get('fmt')}/{f.get('seed_model')}] {f.get('kind')}: "
                         f"{f.get('mutation')}\n    {f.get('exc', '')}\n    repro: {repro_command(self.seed, f.get('case'))}"
                         + (f"\n    {f['tb'].strip().splitlines()[-3:]}" if f.get("tb") else ""))
        more = len(self.failures) - limit
        return "\n".join(lines) + (f"\n... and {more} more" if more > 0 else "")


def run_fuzz(seed: int, cases: int, workdir: str, timeout_s: float = SUITE_TIMEOUT_S,
             per_case_timeout_s: float = PER_CASE_TIMEOUT_S, mem_limit: int = MEMORY_LIMIT,
             max_restarts: int = 5, keep_dir: Optional[str] = None, nice: int = 0) -> FuzzReport:
    """Run cases [0, cases) in child processes; a crash or hang at case k restarts at k + 1."""
    rep = FuzzReport(seed, cases)
    progress = os.path.join(workdir, "progress.jsonl")
    open(progress, "w").close()
    start, t0 = 0, time.perf_counter()
    deadline = t0 + timeout_s
    while start < cases:
        cmd = [sys.executable, os.path.abspath(__file__), "child", "--seed", str(seed), "--start", str(start),
               "--stop", str(cases), "--workdir", workdir, "--progress", progress,
               "--per-case-timeout", str(per_case_timeout_s), "--mem-limit", str(mem_limit)]
        if keep_dir:
            cmd += ["--keep", keep_dir]
        if nice:
            cmd = ["nice", "-n", str(nice)] + cmd
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        stderr_path = os.path.join(workdir, f"stderr{rep.restarts}.txt")
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=_ROOT, env=env)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                timed_out = True
        with open(stderr_path, "rb") as f:
            stderr = f.read().decode("utf-8", "replace")
        last_start, ended, done = _scan_progress(progress, rep)
        if done:
            break
        if timed_out:
            rep.failures.append({"kind": "suite timeout", "case": last_start.get("case"),
                                 "fmt": last_start.get("fmt"), "seed_model": last_start.get("seed_model"),
                                 "mutation": last_start.get("mutation"),
                                 "exc": f"the whole fuzz exceeded {timeout_s:.0f} s (at case {last_start.get('case')})"})
            break
        # The child died: the case that started without ending is the culprit.
        if last_start and last_start.get("case") not in ended:
            hang = "Timeout (" in stderr
            rep.failures.append({
                "kind": "hang" if hang else f"crash (exit status {rc})",
                "case": last_start["case"], "fmt": last_start.get("fmt"),
                "seed_model": last_start.get("seed_model"), "mutation": last_start.get("mutation"),
                "exc": stderr.strip()[-1500:]})
            start = last_start["case"] + 1
        else:
            rep.failures.append({"kind": f"child exited with status {rc} outside a case", "case": None,
                                 "exc": stderr.strip()[-1500:]})
            break
        rep.restarts += 1
        if rep.restarts > max_restarts:
            rep.failures.append({"kind": "too many crashes", "case": None, "exc": f"gave up after {max_restarts}"})
            break
    rep.seconds = time.perf_counter() - t0
    return rep


def _scan_progress(progress, rep: FuzzReport):
    """Re-read the whole progress log into ``rep``; returns (last start event, ended cases, done)."""
    rep.outcomes.clear()
    rep.failures[:] = [f for f in rep.failures if f.get("kind") not in CASE_FAILURES]
    rep.seed_errors.clear()
    starts, ended, last_start, done = {}, set(), {}, False
    slow = []
    with open(progress) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if ev["event"] == "start":
                starts[ev["case"]] = ev
                last_start = ev
            elif ev["event"] == "end":
                ended.add(ev["case"])
                st = starts.get(ev["case"], {})
                fmt = ev.get("fmt") or st.get("fmt")
                rep.outcomes[(fmt, ev["outcome"])] += 1
                if ev.get("seconds") is not None:
                    slow.append((ev["seconds"], ev["case"], st.get("mutation", ""), fmt))
                if ev["outcome"] in CASE_FAILURES:
                    rep.failures.append({"kind": ev["outcome"], "case": ev["case"], "fmt": fmt,
                                         "seed_model": st.get("seed_model"), "mutation": st.get("mutation"),
                                         "exc": ev.get("exc"), "tb": ev.get("tb"), "kept": ev.get("kept")})
            elif ev["event"] == "seed_error":
                rep.seed_errors.append(ev)
            elif ev["event"] == "done":
                done = True
                rep.maxrss_mb = max(rep.maxrss_mb, ev.get("maxrss_mb", 0))
    rep.done = len(ended)
    rep.slowest = sorted(slow, reverse=True)[:5]
    return last_start, ended, done


def markdown_summary(rep: FuzzReport) -> str:
    """The results as a markdown snippet (for docs/reliability.md and bench/results.md)."""
    lines = [f"Fuzz seed {rep.seed}: {rep.done} mutated files in {rep.seconds:.0f} s "
             f"(child peak RSS {rep.maxrss_mb:.0f} MB, {rep.restarts} restarts).", "",
             "| format | files | loaded and ran | (non-finite outputs) | refused: FormatError | UnsupportedModelError "
             "| InputError | other | failures |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bad = set(CASE_FAILURES)
    for fmt, c in sorted(rep.by_format().items(), key=lambda kv: str(kv[0])):
        total = sum(c.values())
        ran = c["ran"] + c["ran:nonfinite"]
        fe, ue, ie = c["refused:FormatError"], c["refused:UnsupportedModelError"], c["refused:InputError"]
        fails = sum(v for k, v in c.items() if k in bad)
        other = total - ran - fe - ue - ie - fails
        lines.append(f"| {fmt} | {total} | {ran} | {c['ran:nonfinite']} | {fe} | {ue} | {ie} | {other} | {fails} |")
    crashes = [f for f in rep.failures if f["kind"] not in bad]
    known = Counter(known_bug(f) for f in rep.failures if known_bug(f))
    lines += ["", f"Failures (non-LSTMError escapes, crashes, hangs, memory amplification): {len(rep.failures)}"
              + (f", of which crashes/hangs: {len(crashes)}" if crashes else "")
              + (f"; known and reported: {', '.join(f'{k} x{n}' for k, n in known.most_common())}"
                 f"; new: {len(rep.failures) - sum(known.values())}" if known else "") + "."]
    if rep.slowest:
        s, case, mut, _ = rep.slowest[0]
        lines.append(f"Slowest file: {s * 1000:.0f} ms (case {case}: {mut[:80]}).")
    return "\n".join(lines)


# =============================================================================================
# pytest
# =============================================================================================
def _run_suite_fuzz(tmp_dir) -> FuzzReport:
    return run_fuzz(DEFAULT_SEED, SUITE_CASES, str(tmp_dir), keep_dir=os.path.join(str(tmp_dir), "kept"))


try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def fuzz_report(tmp_path_factory):
        return _run_suite_fuzz(tmp_path_factory.mktemp("fuzz"))

    def test_seeds_load_unmutated(fuzz_report):
        """Every seed model of every format loads and runs before it is mutated."""
        assert not fuzz_report.seed_errors, fuzz_report.seed_errors

    def test_fuzz_no_crash_no_hang(fuzz_report):
        """The child never died (segfault, abort, out of memory under RLIMIT_AS) or hung."""
        bad = [f for f in fuzz_report.failures if f["kind"] not in CASE_FAILURES and not known_bug(f)]
        assert not bad, "\n" + FuzzReport(fuzz_report.seed, 0, failures=bad).describe_failures()

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_fuzz_only_lstm_errors(fuzz_report, fmt):
        """Every mutated file of this format loaded and ran, or raised an LSTMError."""
        mine = [f for f in fuzz_report.failures if f.get("fmt") == fmt and f["kind"] in CASE_FAILURES]
        bad = [f for f in mine if not known_bug(f)]
        known = Counter(known_bug(f) for f in mine if known_bug(f))
        if known:
            print(f"\n{fmt}: known bugs hit (not failing this test): {dict(known)}")
        c = fuzz_report.by_format().get(fmt, Counter())
        assert sum(c.values()) >= SUITE_CASES // len(FORMATS) - 1 or bad, dict(c)
        assert not bad, (f"\n{len(bad)} of {sum(c.values())} {fmt} files escaped (seed {fuzz_report.seed}):\n"
                         + FuzzReport(fuzz_report.seed, 0, failures=bad).describe_failures())

    def test_fuzz_volume_and_budget(fuzz_report):
        """At least 1,000 mutated files, each well inside its time budget, in bounded memory."""
        assert fuzz_report.done >= 1000, fuzz_report.done
        slow = [s for s in fuzz_report.slowest if s[0] > 5.0
                and not known_bug({"kind": "slow", "fmt": s[3], "mutation": s[2]})]
        assert not slow, f"files taking more than 5 s to refuse or run: {slow}"
        print("\n" + markdown_summary(fuzz_report))

    @pytest.mark.parametrize("ext", [".lstm", ".safetensors"])
    def test_regression_deeply_nested_json_header(tmp_path, ext):
        """Found by this fuzzer: a safetensors-layout header nested 5,000 deep made json.loads
        raise RecursionError out of lstm_cpu.load (packed.read_header, also reached by the format
        sniffing of any .safetensors file). It must be a FormatError."""
        import lstm_cpu

        hb = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
        path = tmp_path / ("m" + ext)
        path.write_bytes(struct.pack("<Q", len(hb)) + hb)
        with pytest.raises(lstm_cpu.LSTMError):
            lstm_cpu.load(path)

    @pytest.mark.parametrize("tensor,dtype", [("meta", "F64"), ("fpar", "I64")])
    def test_regression_packed_meta_fpar_dtype(tmp_path, tensor, dtype):
        """Found by this fuzzer: a packed file whose meta (int64) or fpar (float64) is stored as
        another dtype, values converted and checksum recomputed, loaded; the first step then
        raised numba's TypingError (F64 meta) or compiled a new kernel specialisation for ~10 s
        and ran garbage activation parameters (I64 fpar). It must be refused at load."""
        import lstm_cpu
        from lstm_cpu import LayerParams, LSTMModel

        rng = np.random.default_rng(0)
        path = tmp_path / "m.lstm"
        LSTMModel([[LayerParams(rng.normal(size=(20, 3)), rng.normal(size=(20, 5)), rng.normal(size=20))]]).save(path)
        h, body = split_st(path.read_bytes())
        o = h[tensor]["data_offsets"]
        old = np.frombuffer(body[o[0]:o[1]], "<i8" if tensor == "meta" else "<f8")
        body = body[:o[0]] + old.astype("<f8" if dtype == "F64" else "<i8").tobytes() + body[o[1]:]
        h[tensor]["dtype"] = dtype
        path.write_bytes(resign_packed(join_st(h, body)))
        with pytest.raises(lstm_cpu.LSTMError):
            lstm_cpu.load(path)

    def test_make_case_is_reproducible():
        """A case is a pure function of (seed, case): the repro command regenerates the same bytes."""
        seeds = build_seeds(DEFAULT_SEED)
        for case in (0, 1, 2, 3, 57):
            a = make_case(seeds, DEFAULT_SEED, case)
            b = make_case(build_seeds(DEFAULT_SEED) if case == 57 else seeds, DEFAULT_SEED, case)
            assert a[2] == b[2] and a[3] == b[3]


# =============================================================================================
# Command line: child / run / repro
# =============================================================================================
def _repro(args) -> int:
    import lstm_cpu

    seeds = build_seeds(args.seed)
    fmt, sm, files, desc = make_case(seeds, args.seed, args.case)
    folder = args.keep or tempfile.mkdtemp(prefix="lstm-fuzz-repro-")
    path = write_case(os.path.join(folder, "model"), files, os.path.join(folder, "outside.bin"))
    print(f"case {args.case}: {fmt} seed model {sm.name!r}, mutation: {desc}\nfile: {path}\n"
          f"options: {sm.options}")
    try:
        m = lstm_cpu.load(path, **sm.options)
    except lstm_cpu.LSTMError as exc:
        print(f"refused: {type(exc).__name__}: {exc}")
        return 0
    print("loaded:", m, "->", exercise(m, np.random.default_rng([args.seed, args.case, 1])))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--stop", type=int, required=True)
    c.add_argument("--workdir", required=True)
    c.add_argument("--progress", required=True)
    c.add_argument("--per-case-timeout", type=float, default=PER_CASE_TIMEOUT_S)
    c.add_argument("--mem-limit", type=int, default=MEMORY_LIMIT)
    c.add_argument("--keep", default=None)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, default=DEFAULT_SEED)
    r.add_argument("--cases", type=int, default=SUITE_CASES)
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--keep", default=None)
    p = sub.add_parser("repro")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--case", type=int, required=True)
    p.add_argument("--keep", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "child":
        return child_main(args)
    if args.cmd == "repro":
        return _repro(args)
    work = tempfile.mkdtemp(prefix="lstm-fuzz-")
    rep = run_fuzz(args.seed, args.cases, work, timeout_s=args.timeout, keep_dir=args.keep or os.path.join(work, "kept"))
    print(markdown_summary(rep))
    if rep.failures:
        print("\n" + rep.describe_failures(50))
    return 1 if rep.failures or rep.seed_errors else 0


if __name__ == "__main__":
    sys.exit(main())
