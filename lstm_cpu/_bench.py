"""Benchmark machinery behind ``lstm-cpu bench`` and ``bench/run_matrix.py``.

Method (see ``docs`` of the CLI and ``bench/README.md``):

1. Every runtime gets the *same* weights: onnxruntime and OpenVINO through
   ``lstm_cpu.importers.onnx_export.to_onnx(model)``, torch through an ``nn.LSTM`` whose parameters are
   copied from the canonical :class:`~lstm_cpu.spec.LayerParams` (torch's gate order *is* the
   canonical one, so no permutation).
2. Validate before timing (karpathy/llm.c ``dev/cuda``): each peer runs a short sequence with the
   same state feeding that is timed later; its outputs are compared with ours and the max abs
   difference is reported. A difference above :data:`TOLERANCE` is reported loudly.
3. Time in interleaved rounds: each round runs one block of calls per runtime, in a rotating
   order, so slow drift of the machine (another job, frequency, thermal) hits all runtimes alike.
   Every call is timed on its own, so the report has a latency *distribution* (p50, p90, p99, max).
4. Ours is timed in steady state only. The JIT compile (or Numba cache load) of the first call
   and the first step of a fresh stream are measured apart and reported apart.
5. Next to our achieved weight bandwidth, two figures from the same run: a numpy copy of a large
   array (memory bandwidth) and numpy's BLAS matrix-vector product over the same weights, fused
   per layer into ``(4H, in + out)`` (the "in-run bound": a step must read every weight once).

Peers (onnxruntime, torch, openvino), tqdm and matplotlib are imported lazily; a missing one is
skipped with a note. This module itself imports only the standard library, numpy and lstm_cpu.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError, LSTMError
from .spec import LayerParams, is_default_activations

#: A peer whose outputs differ from ours by more than this (max abs, float32) is a mismatch.
TOLERANCE = 1e-4
#: Peers in the order they are reported; ``--compare`` accepts these names.
PEERS = ("onnxruntime", "torch", "openvino")
MODES = ("step", "sequence", "streams")
#: The embedded default model: input size, hidden size, layers.
DEFAULT_SIZE = (64, 256, 2)
DEFAULT_SEED = 0
#: Steps of the validation sequence run by every runtime before timing.
CHECK_STEPS = 8
SCHEMA = "lstm-cpu-bench/1"


class PeerUnavailable(Exception):
    """A peer cannot run this model here (not installed, unsupported feature); carries the note."""


# =============================================================================================
# Configuration
# =============================================================================================
@dataclass
class BenchConfig:
    """What to measure. ``steps``/``warmup`` count calls: one step, or one whole sequence."""

    mode: str = "step"
    steps: Optional[int] = None  # timed calls per runtime; None: a default per mode
    warmup: Optional[int] = None  # untimed calls per runtime before the rounds
    rounds: int = 10  # interleaved rounds; each times steps/rounds calls per runtime
    threads: int = 1
    seq_len: int = 500
    batch: Optional[int] = None  # None: 1 for step and sequence, 64 for streams
    compare: Optional[Sequence[str]] = None  # None: every installed peer
    size: Tuple[int, int, int] = DEFAULT_SIZE
    seed: int = DEFAULT_SEED
    model_path: Optional[str] = None
    load_options: Dict[str, object] = field(default_factory=dict)
    membw_mb: int = 256  # size of the array copied for the memory-bandwidth figure; 0: skip
    cold_process: bool = False  # also measure compile and cold start in fresh processes
    progress: Optional[bool] = None  # None: only when stderr is a terminal
    command: Optional[str] = None  # recorded in the result

    def resolved(self) -> "BenchConfig":
        """A copy with every default filled in and every value checked (InputError if bad)."""
        c = BenchConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if c.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {c.mode!r}")
        if c.batch is None:
            c.batch = 64 if c.mode == "streams" else 1
        if c.mode == "step" and c.batch != 1:
            raise InputError(f"mode 'step' streams one sample (batch 1), got --batch {c.batch}; "
                             "use --mode streams for batched streams")
        if c.steps is None:
            c.steps = {"step": 2000, "streams": 500, "sequence": 10}[c.mode]
        if c.warmup is None:
            c.warmup = {"step": 200, "streams": 50, "sequence": 2}[c.mode]
        for name in ("steps", "rounds", "threads", "seq_len", "batch"):
            v = getattr(c, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if c.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {c.warmup}")
        c.rounds = min(c.rounds, c.steps)
        if len(c.size) != 3 or min(c.size) < 1:
            raise InputError(f"size must be three positive integers I,H,L, got {c.size!r}")
        if c.compare is not None:
            bad = [p for p in c.compare if p not in PEERS]
            if bad:
                raise InputError(f"unknown peer {bad[0]!r}; expected some of {', '.join(PEERS)}")
        return c


# =============================================================================================
# Machine, versions, BLAS threads
# =============================================================================================
def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_caches() -> Dict[str, str]:
    """Cache sizes of cpu0 from sysfs, e.g. {"L1d": "32K", "L2": "512K", "L3": "32768K"}."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    for k in range(8):
        level = _read(f"{base}/index{k}/level")
        if level is None:
            break
        kind = _read(f"{base}/index{k}/type") or ""
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[name] = _read(f"{base}/index{k}/size") or "?"
    return out


def _openblas_lib():
    """The OpenBLAS numpy loaded, through ctypes, or None (used to pin its thread count)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return None
    for p in sorted(paths):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


_BLAS_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
             "openblas_get_num_threads64_", "openblas_get_num_threads")
_BLAS_CORE = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
              "openblas_get_corename64_", "openblas_get_corename")


def blas_threads(n: Optional[int] = None) -> Optional[int]:
    """Set numpy's BLAS thread count to ``n`` (if given); return the count in force, or None.

    threadpoolctl is used when installed; otherwise OpenBLAS is called through ctypes.
    """
    try:
        import threadpoolctl  # noqa: PLC0415 - optional

        if n is not None:
            threadpoolctl.threadpool_limits(n, user_api="blas")
        infos = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        return int(infos[0]["num_threads"]) if infos else None
    except ImportError:
        pass
    lib = _openblas_lib()
    if lib is None:
        return None
    if n is not None:
        for name in _BLAS_SET:
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                break
    for name in _BLAS_GET:
        if hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def blas_info() -> Dict[str, object]:
    info: Dict[str, object] = {}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["name"] = blas.get("name")
        info["version"] = blas.get("version")
    except Exception:  # noqa: BLE001 - informational only
        pass
    lib = _openblas_lib()
    if lib is not None:
        for name in _BLAS_CORE:
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_char_p
                info["core"] = fn().decode()
                break
    info["threads"] = blas_threads()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def _version(mod_name: str) -> Optional[str]:
    """Version of an installed distribution without importing it (None if missing)."""
    try:
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            return version(mod_name)
        except PackageNotFoundError:
            return None
    except ImportError:  # pragma: no cover
        return None


def versions() -> Dict[str, Optional[str]]:
    import numba  # noqa: PLC0415 - always installed; lazy keeps `--help` fast

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "lstm_cpu": _version("lstm-cpu"),
    }
    for peer in PEERS:
        out[peer] = _version(peer)
    try:
        import lstm_cpu  # noqa: PLC0415

        out["lstm_cpu"] = out["lstm_cpu"] or getattr(lstm_cpu, "__version__", None)
        out["numba_threading_layer"] = lstm_cpu.threading_layer()
    except Exception:  # noqa: BLE001 - informational only
        out["numba_threading_layer"] = None
    return out


def machine_info() -> Dict[str, object]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "caches": cpu_caches(),
        "platform": platform.platform(),
        "blas": blas_info(),
    }


def installed_peers() -> List[str]:
    return [p for p in PEERS if _version(p) is not None]


# =============================================================================================
# Models
# =============================================================================================
def embedded_layers(input_size: int, hidden_size: int, num_layers: int,
                    seed: int = DEFAULT_SEED) -> List[List[LayerParams]]:
    """A fixed-seed unidirectional stack, initialised like torch (uniform +-1/sqrt(H)), float32."""
    rng = np.random.default_rng(seed)
    k = 1.0 / math.sqrt(hidden_size)
    layers = []
    for layer in range(num_layers):
        n_in = input_size if layer == 0 else hidden_size
        u = lambda *shape: rng.uniform(-k, k, size=shape).astype(np.float32)  # noqa: E731
        layers.append([LayerParams(
            w_ih=u(4 * hidden_size, n_in),         # (4H, in)   gates i, f, g, o
            w_hh=u(4 * hidden_size, hidden_size),  # (4H, H)
            bias=u(4 * hidden_size) + u(4 * hidden_size),  # (4H,) b_ih + b_hh folded
        )])
    return layers


def embedded_model(size: Sequence[int] = DEFAULT_SIZE, seed: int = DEFAULT_SEED):
    """The default benchmark model as an LSTMModel."""
    from .model import LSTMModel  # noqa: PLC0415 - keep import of this module cheap

    i, h, n = (int(v) for v in size)
    return LSTMModel(embedded_layers(i, h, n, seed),
                     source={"format": "embedded", "seed": seed, "size": f"{i},{h},{n}"})


def model_layers(model) -> Optional[List[List[LayerParams]]]:
    """The canonical per-layer, per-direction weights of ``model`` (float32), or None."""
    getter = getattr(model, "layer_params", None)
    if not callable(getter):
        return None
    rows = []
    for dirs in getter():
        row = []
        for p in dirs:
            f32 = lambda a: None if a is None else np.ascontiguousarray(a, np.float32)  # noqa: E731
            row.append(LayerParams(f32(p.w_ih), f32(p.w_hh), f32(p.bias), f32(p.w_hr),
                                   f32(p.peephole), p.activations))
        rows.append(row)
    return rows


def model_head(model):
    """(weight (O, D*out), bias (O,) | None) or None."""
    return getattr(model, "head", None)


def weight_bytes(model, layers) -> int:
    """Bytes of the weights one step must read (matrices, biases, peepholes, head)."""
    info = {}
    try:
        info = model.info()
    except Exception:  # noqa: BLE001 - fall back to counting ourselves
        pass
    for key in ("weight_bytes", "weights_bytes", "bytes"):
        if isinstance(info.get(key), (int, np.integer)):
            return int(info[key])
    if layers is None:
        return 0
    itemsize = np.dtype(getattr(model, "dtype", np.float32)).itemsize
    n = 0
    for dirs in layers:
        for p in dirs:
            for a in (p.w_ih, p.w_hh, p.bias, p.w_hr, p.peephole):
                if a is not None:
                    n += int(np.size(a))
    return n * itemsize


def matmul_flops(model, layers) -> int:
    """Floating-point operations of one step's matrix products at batch 1 (2 per weight)."""
    if layers is None:
        return 0
    n = sum(int(np.size(a)) for dirs in layers for p in dirs
            for a in (p.w_ih, p.w_hh, p.w_hr) if a is not None)
    head = model_head(model)
    if head is not None:
        n += int(np.size(head[0]))
    return 2 * n


def describe_model(model, layers, source: str) -> Dict[str, object]:
    info = {}
    try:
        info = dict(model.info())
    except Exception:  # noqa: BLE001
        pass
    d = {
        "source": source,
        "input_size": int(model.input_size),
        "hidden_size": int(model.hidden_size),
        "proj_size": int(getattr(model, "proj_size", 0) or 0),
        "num_layers": int(model.num_layers),
        "num_directions": int(model.num_directions),
        "output_size": int(getattr(model, "output_size", 0) or 0),
        "dtype": str(np.dtype(getattr(model, "dtype", np.float32))),
        "weight_bytes": weight_bytes(model, layers),
    }
    for k in ("parameter_count", "parameters", "num_parameters"):
        if k in info:
            d["parameter_count"] = info[k]
            break
    for k in ("kernel", "chunks"):
        if k in info:
            d[k] = info[k]
    return d


# =============================================================================================
# Runners: one per runtime. ``outputs(xs)`` runs the check sequence from the initial state;
# ``make_call()`` returns a zero-argument callable doing one timed unit with state fed back.
# =============================================================================================
class Runner:
    name = "?"
    kind = "peer"  # "ours", "peer" or "bound"
    steps_per_call = 1  # time steps done by one call (T in sequence mode)
    note = ""

    def contexts(self) -> List[contextlib.AbstractContextManager]:
        """Context managers held open while this runner is timed (e.g. torch.inference_mode)."""
        return []

    def outputs(self, xs: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def make_call(self) -> Callable[[], object]:  # pragma: no cover - interface
        raise NotImplementedError


def _initial_state(model, batch: int):
    """(h0 (L*D, B, out), c0 (L*D, B, H)) float32: the model's own starting state, batch-expanded."""
    ld = model.num_layers * model.num_directions
    out = model.proj_size or model.hidden_size
    h0 = np.zeros((ld, batch, out), np.float32)
    c0 = np.zeros((ld, batch, model.hidden_size), np.float32)
    init = getattr(model, "initial_state", None)
    if init is not None:
        h, c = init
        h0[:] = np.asarray(h, np.float32).reshape(ld, 1, out)
        c0[:] = np.asarray(c, np.float32).reshape(ld, 1, model.hidden_size)
    return h0, c0


class OursRunner(Runner):
    name, kind = "lstm-cpu", "ours"

    def __init__(self, model, cfg: BenchConfig):
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def _stream(self):
        return self.model.stream(batch=None if self.cfg.mode == "step" else self.cfg.batch)

    def outputs(self, xs):
        # xs (T, B, I). Step modes: one step at a time through a stream, like the timed calls.
        if self.cfg.mode == "sequence":
            y, _ = self.model.run(xs)
            return np.asarray(y)  # (T, B, D*out|O)
        s = self._stream()
        ys = []
        for t in range(xs.shape[0]):
            x = xs[t, 0] if self.cfg.mode == "step" else xs[t]  # (I,) or (B, I)
            ys.append(np.array(s.step(x), copy=True).reshape(xs.shape[1], -1))
        return np.stack(ys)  # (T, B, out)

    def first_call(self, x) -> Tuple[float, float]:
        """(seconds to create a stream, seconds of its first call): JIT compile or cache load if
        it is the first call in the process, else the cold-cache cost of a new stream."""
        if self.cfg.mode == "sequence":
            t0 = time.perf_counter()
            self.model.run(x)
            return 0.0, time.perf_counter() - t0
        t0 = time.perf_counter()
        s = self._stream()
        t1 = time.perf_counter()
        s.step(x)
        return t1 - t0, time.perf_counter() - t1

    def make_call(self):
        x = self.x
        if self.cfg.mode == "sequence":
            run = self.model.run
            return lambda: run(x)
        step = self._stream().step
        return lambda: step(x)


class OnnxRuntimeRunner(Runner):
    """One InferenceSession; the state is fed as inputs and read back from the outputs each call."""

    name = "onnxruntime"

    def __init__(self, model, cfg: BenchConfig, onnx_bytes: bytes):
        try:
            import onnxruntime as ort  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install onnxruntime") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        self.io = OnnxIO(self.sess.get_inputs(), self.sess.get_outputs(), model)
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def outputs(self, xs):
        if self.cfg.mode == "sequence":
            feeds = self.io.feeds(xs, *_initial_state(self.model, xs.shape[1]))
            return self.io.y(self.sess.run(None, feeds))
        feeds = self.io.feeds(xs[:1], *_initial_state(self.model, xs.shape[1]))
        ys = []
        for t in range(xs.shape[0]):
            feeds[self.io.x_name] = xs[t : t + 1]
            outs = self.sess.run(None, feeds)
            ys.append(self.io.y(outs)[0])
            self.io.feed_back(feeds, outs)
        return np.stack(ys)

    def make_call(self):
        feeds = self.io.feeds(self.x, *_initial_state(self.model, self.x.shape[1]))
        run, names = self.sess.run, self.io.output_names
        if self.cfg.mode == "sequence":
            return lambda: run(names, feeds)
        feed_back = self.io.feed_back

        def call():
            outs = run(names, feeds)
            feed_back(feeds, outs)

        return call


class OnnxIO:
    """How the exported graph names its data and state inputs/outputs.

    Understood layouts (``lstm_cpu.importers.onnx_export.to_onnx`` picks one):
    - stacked: ``initial_h (L*D, B, out)``, ``initial_c (L*D, B, H)`` -> ``Y_h``, ``Y_c``;
    - per layer: ``initial_h_<k>``/``initial_c_<k>`` (or ``h0_<k>``) -> ``Y_h_<k>``/``Y_c_<k>``,
      each ``(D, B, .)``.
    State outputs are matched to state inputs by name after stripping initial_/_out prefixes and
    suffixes; failing that, by position (inputs after the data input, outputs after ``Y``).
    """

    def __init__(self, inputs, outputs, model):
        ld = model.num_layers * model.num_directions
        in_names = [i.name for i in inputs]
        out_names = [o.name for o in outputs]
        self.output_names = out_names
        data = [n for n in in_names if n.lower() in ("x", "input", "inputs", "data")]
        self.x_name = data[0] if data else in_names[0]
        state_in = [n for n in in_names if n != self.x_name]
        y = [n for n in out_names if n.lower() in ("y", "output", "outputs")]
        self.y_index = out_names.index(y[0]) if y else 0
        state_out = [n for i, n in enumerate(out_names) if i != self.y_index]
        if len(state_in) % 2 or not state_in:
            raise PeerUnavailable(
                f"exported graph has no h/c state inputs to feed (inputs {in_names}); "
                "step modes need them")
        if len(state_out) < len(state_in):
            raise PeerUnavailable(f"exported graph returns no final state (outputs {out_names})")
        self.pairs = []  # (input name, output index) to feed back
        for n in state_in:
            key = _state_key(n)
            match = [i for i, o in enumerate(out_names) if i != self.y_index and _state_key(o) == key]
            idx = match[0] if match else out_names.index(state_out[state_in.index(n)])
            self.pairs.append((n, idx))
        self.n_groups = len(state_in) // 2  # 1 when stacked, L when per layer
        self.ld = ld
        self.h_names = [n for n in state_in if _state_kind(n) == "h"]
        self.c_names = [n for n in state_in if _state_kind(n) == "c"]
        if len(self.h_names) != len(self.c_names) or not self.h_names:
            # names carry no h/c: assume alternating h, c or all h then all c (ONNX order)
            half = len(state_in) // 2
            self.h_names, self.c_names = state_in[:half], state_in[half:]

    def feeds(self, x, h0, c0):
        """x (T, B, I); h0 (L*D, B, out); c0 (L*D, B, H) -> input dict."""
        f = {self.x_name: np.ascontiguousarray(x, np.float32)}
        g = len(self.h_names)
        per = h0.shape[0] // g
        for k, (hn, cn) in enumerate(zip(self.h_names, self.c_names)):
            f[hn] = np.ascontiguousarray(h0[k * per : (k + 1) * per])
            f[cn] = np.ascontiguousarray(c0[k * per : (k + 1) * per])
        return f

    def feed_back(self, feeds, outs):
        for name, idx in self.pairs:
            feeds[name] = outs[idx]

    def y(self, outs):
        """Y as (T, B, D*out|O): the ONNX LSTM's (T, D, B, out) is folded when needed."""
        y = np.asarray(outs[self.y_index])
        if y.ndim == 4:  # (T, D, B, out) -> (T, B, D*out)
            y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
        return y


def _state_kind(name: str) -> Optional[str]:
    n = name.lower()
    for tag, kind in (("initial_h", "h"), ("initial_c", "c"), ("y_h", "h"), ("y_c", "c"),
                      ("h0", "h"), ("c0", "c"), ("h_n", "h"), ("c_n", "c")):
        if tag in n:
            return kind
    parts = n.replace(".", "_").split("_")
    if "h" in parts:
        return "h"
    if "c" in parts:
        return "c"
    return None


def _state_key(name: str) -> Tuple[Optional[str], str]:
    """('h'|'c', trailing layer tag) so that initial_h_1 matches Y_h_1 and initial_h matches Y_h."""
    kind = _state_kind(name)
    digits = "".join(ch for ch in name if ch.isdigit())
    for tag in ("h0", "c0"):  # the 0 of h0/c0 is not a layer index
        if tag in name.lower() and digits.startswith("0"):
            digits = digits[1:]
    return kind, digits


class TorchRunner(Runner):
    """nn.LSTM with the canonical weights copied in; one call per step (or per sequence)."""

    name = "torch"

    def __init__(self, model, layers, cfg: BenchConfig):
        try:
            import torch  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install torch") from None
        if layers is None:
            raise PeerUnavailable("the model does not expose its canonical weights")
        p0 = layers[0][0]
        for dirs in layers:
            for p in dirs:
                if p.peephole is not None:
                    raise PeerUnavailable("nn.LSTM has no peepholes")
                if not is_default_activations(p.activations):
                    raise PeerUnavailable("nn.LSTM has only sigmoid/tanh/tanh activations")
        if getattr(model, "clip", None) or getattr(model, "input_forget", False):
            raise PeerUnavailable("nn.LSTM has no cell clip or coupled input-forget gate")
        head = model_head(model)
        torch.set_num_threads(cfg.threads)
        with contextlib.suppress(RuntimeError):  # only allowed before any parallel work
            torch.set_num_interop_threads(1)
        self.torch = torch
        H, P, D = p0.hidden_size, (model.proj_size or 0), model.num_directions
        lstm = torch.nn.LSTM(model.input_size, H, num_layers=model.num_layers, bias=True,
                             proj_size=P, bidirectional=D == 2)
        with torch.no_grad():
            for k, dirs in enumerate(layers):
                for d, p in enumerate(dirs):
                    sfx = f"l{k}" + ("_reverse" if d else "")
                    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
                    getattr(lstm, f"weight_ih_{sfx}").copy_(t(p.w_ih))
                    getattr(lstm, f"weight_hh_{sfx}").copy_(t(p.w_hh))
                    b = np.zeros(4 * H, np.float32) if p.bias is None else p.bias
                    getattr(lstm, f"bias_ih_{sfx}").copy_(t(b))
                    getattr(lstm, f"bias_hh_{sfx}").zero_()  # biases are folded in ours
                    if P:
                        getattr(lstm, f"weight_hr_{sfx}").copy_(t(p.w_hr))
        lstm.eval()
        self.lstm = lstm
        self.linear = None
        if head is not None:
            w, b = head
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
                if b is not None:
                    lin.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
            self.linear = lin.eval()
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def contexts(self):
        return [self.torch.inference_mode()]

    def _state(self, batch):
        h0, c0 = _initial_state(self.model, batch)
        return self.torch.from_numpy(h0), self.torch.from_numpy(c0)

    def outputs(self, xs):
        torch = self.torch
        with torch.inference_mode():
            st = self._state(xs.shape[1])
            if self.cfg.mode == "sequence":
                y, _ = self.lstm(torch.from_numpy(xs), st)
                if self.linear is not None:
                    y = self.linear(y)
                return y.numpy().copy()
            ys = []
            for t in range(xs.shape[0]):
                y, st = self.lstm(torch.from_numpy(xs[t : t + 1]), st)
                if self.linear is not None:
                    y = self.linear(y)
                ys.append(y.numpy()[0].copy())
            return np.stack(ys)

    def make_call(self):
        x = self.torch.from_numpy(self.x)  # (1|T, B, I)
        lstm, linear = self.lstm, self.linear
        box = [self._state(self.x.shape[1])]
        if self.cfg.mode == "sequence":
            if linear is None:
                return lambda: lstm(x, box[0])
            return lambda: linear(lstm(x, box[0])[0])

        def call():
            y, box[0] = lstm(x, box[0])
            if linear is not None:
                linear(y)

        return call


class OpenVINORunner(Runner):
    """OpenVINO compiled from the same ONNX; the state is fed back through the inputs."""

    name = "openvino"

    def __init__(self, model, cfg: BenchConfig, onnx_bytes: bytes, shape_x):
        try:
            import openvino as ov  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install openvino") from None
        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(onnx_bytes)
            ovm = core.read_model(path)
        self.io = OnnxIO([_Named(p.get_any_name()) for p in ovm.inputs],
                         [_Named(p.get_any_name()) for p in ovm.outputs], model)
        # Static shapes: OpenVINO compiles one plan per shape.
        h0, c0 = _initial_state(model, shape_x[1])
        sample = self.io.feeds(np.zeros(shape_x, np.float32), h0, c0)
        ovm.reshape({name: list(a.shape) for name, a in sample.items()})
        config = {"INFERENCE_NUM_THREADS": cfg.threads, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1}
        self.compiled = core.compile_model(ovm, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def _run(self, feeds):
        res = self.request.infer(feeds)
        return [np.asarray(res[o]) for o in self.compiled.outputs]

    def outputs(self, xs):
        if self.cfg.mode == "sequence":
            return self.io.y(self._run(self.io.feeds(xs, *_initial_state(self.model, xs.shape[1]))))
        feeds = self.io.feeds(xs[:1], *_initial_state(self.model, xs.shape[1]))
        ys = []
        for t in range(xs.shape[0]):
            feeds[self.io.x_name] = np.ascontiguousarray(xs[t : t + 1])
            outs = self._run(feeds)
            ys.append(self.io.y(outs)[0])
            self.io.feed_back(feeds, [o.copy() for o in outs])
        return np.stack(ys)

    def make_call(self):
        feeds = self.io.feeds(self.x, *_initial_state(self.model, self.x.shape[1]))
        infer, outs_ports = self.request.infer, self.compiled.outputs
        if self.cfg.mode == "sequence":
            return lambda: infer(feeds)
        pairs = [(n, outs_ports[i]) for n, i in self.io.pairs]

        def call():
            res = infer(feeds)
            for name, port in pairs:
                feeds[name] = res[port].copy()  # the request reuses its output buffers

        return call


@dataclass
class _Named:
    name: str


class BoundRunner(Runner):
    """numpy's BLAS product over the same weights, fused per layer and direction into
    ``(4H, in + out)``, plus ``w_hr`` if projected: one step's unavoidable weight traffic.

    Each call costs a numpy call (~1 us) per matrix on top of BLAS, like any Python-driven loop.
    """

    name, kind = "numpy BLAS (bound)", "bound"

    def __init__(self, layers, batch: int, threads: int):
        self.mats = []  # (W (rows, cols) float32, z (cols, B), out (rows, B))
        for dirs in layers:
            for p in dirs:
                w = np.ascontiguousarray(np.concatenate([p.w_ih, p.w_hh], axis=1), np.float32)
                self.mats.append((w, np.ones((w.shape[1], batch), np.float32),
                                  np.empty((w.shape[0], batch), np.float32)))
                if p.w_hr is not None:
                    w = np.ascontiguousarray(p.w_hr, np.float32)
                    self.mats.append((w, np.ones((w.shape[1], batch), np.float32),
                                      np.empty((w.shape[0], batch), np.float32)))
        if batch == 1:  # matrix-vector: (rows, cols) @ (cols,)
            self.mats = [(w, z[:, 0].copy(), o[:, 0].copy()) for w, z, o in self.mats]
        self.threads = threads

    def make_call(self):
        mats, matmul, steps = self.mats, np.matmul, range(self.steps_per_call)

        def call():
            for _ in steps:
                for w, z, o in mats:
                    matmul(w, z, out=o)

        return call


# =============================================================================================
# Measurements
# =============================================================================================
def memory_bandwidth(mb: int, reps: int = 3) -> Optional[Dict[str, float]]:
    """Best-of-``reps`` numpy copy of an ``mb`` MB float32 array; read + write bytes counted."""
    if mb <= 0:
        return None
    n = mb * (1 << 20) // 4
    src = np.ones(n, np.float32)  # (n,) touched once so that page faults are not timed
    dst = np.zeros_like(src)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"array_mb": mb, "copy_gb_s": 2 * src.nbytes / best / 1e9, "method": "numpy copyto, read+write"}


def latency_stats(ns: np.ndarray, steps_per_call: int, batch: int = 1) -> Dict[str, float]:
    """Per-step statistics (µs) from per-call durations (ns); a step advances ``batch`` streams."""
    us = ns.astype(np.float64) / 1e3 / steps_per_call  # (calls,) µs per time step
    total_s = ns.sum() / 1e9
    return {
        "calls": int(ns.size),
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
        "steps_per_s": float(ns.size * steps_per_call / total_s) if total_s > 0 else math.inf,
        "samples_per_s": float(ns.size * steps_per_call * batch / total_s) if total_s > 0 else math.inf,
    }


class _Progress:
    """tqdm if installed, else a plain stderr bar; silent when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.enabled, self.n = total, enabled, 0
        self.bar = None
        self._last = -1
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional

            self.bar = tqdm(total=total, desc=desc, unit="call", file=sys.stderr, leave=False,
                            mininterval=0.25)
        except ImportError:
            self.desc = desc

    def update(self, n: int):
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = int(100 * self.n / max(self.total, 1))
        if pct != self._last:
            self._last = pct
            fill = pct * 30 // 100
            sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (30 - fill)}] {pct:3d}%")
            sys.stderr.flush()

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def time_interleaved(runners: List[Runner], calls: Dict[str, Callable], steps: int, rounds: int,
                     progress: _Progress) -> Dict[str, np.ndarray]:
    """Per-call durations (ns) per runner, ``rounds`` round-robin blocks, rotating the order."""
    block = math.ceil(steps / rounds)
    out: Dict[str, List[int]] = {r.name: [] for r in runners}
    pc = time.perf_counter_ns
    for rnd in range(rounds):
        k = rnd % len(runners)
        for r in runners[k:] + runners[:k]:
            fn = calls[r.name]
            n = min(block, steps - len(out[r.name]))
            if n <= 0:
                continue
            fn()  # one untimed call: the previous runtime's weights evicted ours from cache
            stamps = [pc()]
            append = stamps.append
            for _ in range(n):
                fn()
                append(pc())
            out[r.name].extend(np.diff(np.asarray(stamps, np.int64)).tolist())
            progress.update(n)
    return {name: np.asarray(v, np.int64) for name, v in out.items()}


# =============================================================================================
# Cold start in fresh processes
# =============================================================================================
_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import lstm_cpu
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
if cfg["model_path"]:
    model = lstm_cpu.load(cfg["model_path"], **cfg["load_options"])
else:
    from lstm_cpu._bench import embedded_model
    model = embedded_model(cfg["size"], cfg["seed"])
t2 = time.perf_counter()
x = np.zeros(model.input_size, np.float32)
s = model.stream()
s.step(x)
t3 = time.perf_counter()
s.step(x)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "first_step_s": t3 - t2,
                  "second_step_us": (t4 - t3) * 1e6}))
"""


def cold_process(cfg: BenchConfig, empty_cache: bool) -> Dict[str, object]:
    """Import, model build and first step of a fresh interpreter, from Numba's on-disk cache or
    (``empty_cache``) with an empty cache directory, i.e. a true JIT compile."""
    env = dict(os.environ)
    arg = json.dumps({"model_path": cfg.model_path, "load_options": cfg.load_options,
                      "size": list(cfg.size), "seed": cfg.seed})
    with tempfile.TemporaryDirectory() as tmp:
        if empty_cache:
            env["NUMBA_CACHE_DIR"] = tmp
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, arg], env=env,
                           capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


# =============================================================================================
# The benchmark
# =============================================================================================
def _note(notes: List[str], text: str, echo: Optional[Callable[[str], None]]):
    text = " ".join(text.split())  # peers' errors span lines; a note is one line
    if len(text) > 400:
        text = text[:397] + "..."
    notes.append(text)
    if echo:
        echo(text)


def load_bench_model(cfg: BenchConfig):
    if cfg.model_path:
        import lstm_cpu  # noqa: PLC0415

        opts = {k: v for k, v in cfg.load_options.items() if v is not None}
        return lstm_cpu.load(cfg.model_path, **opts), os.path.basename(cfg.model_path)
    i, h, n = cfg.size
    return embedded_model(cfg.size, cfg.seed), f"embedded I={i} H={h} L={n} seed={cfg.seed}"


def run_bench(cfg: BenchConfig, echo: Optional[Callable[[str], None]] = None,
              model=None, source: Optional[str] = None) -> Dict[str, object]:
    """Run one benchmark configuration and return the JSON-able result.

    ``echo`` receives human-readable notes as they happen (skips, checks, mismatches).
    The thread counts it sets (Numba, numpy's BLAS, torch) are restored afterwards, so that a
    benchmark run inside a larger process (a test session) leaves no trace.
    """
    import numba  # noqa: PLC0415

    saved_numba, saved_blas = numba.get_num_threads(), blas_threads()
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch is not None else None
    try:
        return _run_bench(cfg, echo, model, source)
    finally:
        numba.set_num_threads(saved_numba)
        if saved_blas is not None:
            blas_threads(saved_blas)
        torch = sys.modules.get("torch")
        if torch is not None and saved_torch is not None:
            torch.set_num_threads(saved_torch)


def _alarm(text: str, echo: Optional[Callable[[str], None]]):
    """A mismatch is shown at once on stderr, whatever the output mode."""
    if echo is None or getattr(echo, "quiet", False):
        sys.stderr.write(f"lstm-cpu: WARNING: {text}\n")
        sys.stderr.flush()


def _run_bench(cfg: BenchConfig, echo, model, source) -> Dict[str, object]:
    cfg = cfg.resolved()
    notes: List[str] = []
    # Threads first: the model packs its weights into one chunk per Numba thread.
    import numba  # noqa: PLC0415

    import lstm_cpu  # noqa: PLC0415

    if cfg.threads > numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be <= {numba.config.NUMBA_NUM_THREADS} "
                         f"(NUMBA_NUM_THREADS), got {cfg.threads}")
    numba.set_num_threads(cfg.threads)
    set_threads = getattr(lstm_cpu, "set_num_threads", None)
    if callable(set_threads):
        set_threads(cfg.threads)
    blas_threads(cfg.threads)

    t_load = time.perf_counter()
    if model is None:
        model, source = load_bench_model(cfg)
    load_s = time.perf_counter() - t_load
    layers = model_layers(model)
    if layers is None and not cfg.model_path:
        layers = embedded_layers(*cfg.size, cfg.seed)
    B, T, I = cfg.batch, cfg.seq_len, model.input_size
    if cfg.mode != "sequence" and model.num_directions != 1:
        raise InputError(f"mode {cfg.mode!r} streams through time and needs a unidirectional "
                         f"model, got {model.num_directions} directions; use --mode sequence")

    rng = np.random.default_rng(cfg.seed + 1)
    # One timed unit's input: (I,) for a single stream, (B, I) for batched streams, (T, B, I)
    # for a whole sequence. Peers see the same values with their own leading axes.
    if cfg.mode == "step":
        x_ours = rng.uniform(-1, 1, I).astype(np.float32)  # (I,)
        x_peer = x_ours.reshape(1, 1, I)  # (1, 1, I)
    elif cfg.mode == "streams":
        x_ours = rng.uniform(-1, 1, (B, I)).astype(np.float32)  # (B, I)
        x_peer = x_ours.reshape(1, B, I)  # (1, B, I)
    else:
        x_ours = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)  # (T, B, I)
        x_peer = x_ours

    # --- ours: compile (or cache load) and cold first step, apart from the steady state -------
    ours = OursRunner(model, cfg)
    ours.x = x_ours
    _, compile_s = ours.first_call(x_ours)
    create_s, first_s = ours.first_call(x_ours)
    first_call_us = first_s * 1e6 / ours.steps_per_call

    # --- peers ------------------------------------------------------------------------------
    wanted = list(cfg.compare) if cfg.compare is not None else list(PEERS)
    skipped: Dict[str, str] = {}
    runners: List[Runner] = [ours]
    onnx_bytes = None
    for name in wanted:
        try:
            if name in ("onnxruntime", "openvino") and onnx_bytes is None:
                onnx_bytes = _export_onnx(model)
            if name == "onnxruntime":
                r = OnnxRuntimeRunner(model, cfg, onnx_bytes)
            elif name == "torch":
                r = TorchRunner(model, layers, cfg)
            else:
                r = OpenVINORunner(model, cfg, onnx_bytes, x_peer.shape)
        except PeerUnavailable as e:
            skipped[name] = str(e)
            _note(notes, f"skipped {name}: {e}", echo)
            continue
        except Exception as e:  # noqa: BLE001 - a peer failing must not kill the benchmark
            skipped[name] = f"failed to set up: {type(e).__name__}: {e}"
            _note(notes, f"skipped {name}: {skipped[name]}", echo)
            continue
        r.x = x_peer
        runners.append(r)

    # --- validate before timing ---------------------------------------------------------------
    checks: Dict[str, Dict[str, object]] = {}
    if cfg.mode == "sequence":
        # The timed input itself: peers compiled for a static shape (OpenVINO) accept only it.
        xs, tc = x_ours, T  # (T, B, I)
    else:
        tc = CHECK_STEPS
        xs = rng.uniform(-1, 1, (tc, B, I)).astype(np.float32)  # (T_check, B, I)
    ref = ours.outputs(xs)  # (T_check, B, out)
    for r in list(runners[1:]):
        try:
            got = r.outputs(xs)
            diff = float(np.max(np.abs(got.reshape(ref.shape) - ref)))
        except Exception as e:  # noqa: BLE001
            skipped[r.name] = f"check run failed: {type(e).__name__}: {e}"
            _note(notes, f"skipped {r.name}: {skipped[r.name]}", echo)
            runners.remove(r)
            continue
        ok = bool(diff <= TOLERANCE)
        checks[r.name] = {"max_abs_diff": diff, "ok": ok, "steps": tc}
        if ok:
            _note(notes, f"check {r.name}: max abs diff vs lstm-cpu {diff:.2e} over {tc} steps (ok)",
                  echo)
        else:
            msg = (f"!!! MISMATCH {r.name}: max abs diff vs lstm-cpu {diff:.3e} > {TOLERANCE:g} "
                   f"over {tc} steps: its timings compare different math !!!")
            _note(notes, msg, echo)
            _alarm(msg, echo)
    if layers is not None:
        bound = BoundRunner(layers, B, cfg.threads)
        bound.steps_per_call = ours.steps_per_call  # T matrix products per call in sequence mode
        runners.append(bound)

    # --- warm up, then interleaved rounds -----------------------------------------------------
    calls = {}
    for r in runners:
        calls[r.name] = r.make_call()
    t_warm = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for r in runners:
            for ctx in r.contexts():
                stack.enter_context(ctx)
        per_call_s = {}
        for r in runners:
            fn = calls[r.name]
            n = max(cfg.warmup, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            per_call_s[r.name] = (time.perf_counter() - t0) / n
        estimate_s = cfg.steps * sum(per_call_s.values())
        # Auto: a bar on a terminal for runs longer than ~1.5 s; --progress forces it.
        show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and estimate_s > 1.5)
        progress = _Progress(cfg.steps * len(runners), bool(show), f"bench {cfg.mode}")
        try:
            durations = time_interleaved(runners, calls, cfg.steps, cfg.rounds, progress)
        finally:
            progress.close()
    wall_s = time.perf_counter() - t_warm

    # --- report ---------------------------------------------------------------------------------
    wbytes = weight_bytes(model, layers)
    stats: Dict[str, Dict[str, object]] = {}
    for r in runners:
        s = latency_stats(durations[r.name], r.steps_per_call, B)
        s["kind"] = r.kind
        stats[r.name] = s
    flops = matmul_flops(model, layers) * B  # per step, all streams
    ours_p50 = stats[ours.name]["p50_us"]
    for name, s in stats.items():
        s["ratio_to_ours"] = s["p50_us"] / ours_p50 if ours_p50 > 0 else None
        s["weight_gb_s"] = wbytes / (s["p50_us"] * 1e-6) / 1e9 if s["p50_us"] > 0 else None
        s["gflop_s"] = flops / (s["p50_us"] * 1e-6) / 1e9 if s["p50_us"] > 0 and flops else None
    membw = memory_bandwidth(cfg.membw_mb)
    bound = stats.get(BoundRunner.name)
    result = {
        "schema": SCHEMA,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command,
        "config": {
            "mode": cfg.mode, "batch": B, "seq_len": T if cfg.mode == "sequence" else None,
            "threads": cfg.threads, "steps": cfg.steps, "warmup": cfg.warmup,
            "rounds": cfg.rounds, "seed": cfg.seed, "unit": "call" if cfg.mode == "sequence" else "step",
        },
        "model": describe_model(model, layers, source),
        "machine": machine_info(),
        "versions": versions(),
        "ours": {
            "load_s": load_s,
            "first_call_s": compile_s,  # JIT compile or Numba cache load, plus first call
            "cold_call_us": first_call_us,  # first call on a fresh stream, per step
            "stream_create_us": create_s * 1e6,  # model.stream(...) itself
            "steady_p50_us": ours_p50,
        },
        "checks": checks,
        "skipped": skipped,
        "runtimes": stats,
        "bandwidth": {
            "weight_bytes": wbytes,
            "flops_per_step": flops,  # matrix products only, all B streams
            "ours_gflop_s": stats[ours.name]["gflop_s"],
            "bound_gflop_s": bound["gflop_s"] if bound else None,
            "ours_gb_s": stats[ours.name]["weight_gb_s"],
            "bound_gb_s": bound["weight_gb_s"] if bound else None,
            "bound_method": "numpy BLAS matvec over fused (4H, in+out) per layer" if bound else None,
            "memory_copy_gb_s": membw["copy_gb_s"] if membw else None,
            "memory_copy_mb": membw["array_mb"] if membw else None,
        },
        "wall_s": wall_s,
        "mismatch": any(not c["ok"] for c in checks.values()),
        "notes": notes,
    }
    if cfg.cold_process:
        if echo:
            echo("measuring cold start in fresh processes ...")
        result["ours"]["cold_process_cached"] = cold_process(cfg, empty_cache=False)
        result["ours"]["cold_process_compile"] = cold_process(cfg, empty_cache=True)
    result["_durations_us"] = {r.name: (durations[r.name] / 1e3 / r.steps_per_call).tolist()
                               for r in runners}
    return result


def _export_onnx(model) -> bytes:
    try:
        from lstm_cpu.importers.onnx_export import to_onnx  # noqa: PLC0415 - needs onnx
    except ImportError as e:
        raise PeerUnavailable(f"cannot export to ONNX ({e}); pip install onnx") from None
    try:
        return to_onnx(model).SerializeToString()
    except LSTMError as e:  # e.g. a projection: ONNX's LSTM has none
        raise PeerUnavailable(f"the model cannot be exported to ONNX: {e}") from None


# =============================================================================================
# Text report and plot
# =============================================================================================
def _fmt_us(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_report(res: Dict[str, object]) -> str:
    c, m, o, bw = res["config"], res["model"], res["ours"], res["bandwidth"]
    mach, ver = res["machine"], res["versions"]
    lines = []
    shape = f"I={m['input_size']} H={m['hidden_size']} L={m['num_layers']}"
    if m["proj_size"]:
        shape += f" P={m['proj_size']}"
    if m["num_directions"] == 2:
        shape += " bidirectional"
    what = {"step": "one stream, one step per call (batch 1)",
            "streams": f"{c['batch']} batched streams, one step per call",
            "sequence": f"whole sequence T={c['seq_len']} at batch {c['batch']} per call"}[c["mode"]]
    lines.append(f"model   {m['source']}: {shape}, {m['dtype']}, "
                 f"{m['weight_bytes'] / 1e6:.2f} MB of weights")
    lines.append(f"mode    {c['mode']}: {what}; threads {c['threads']}")
    peers = ", ".join(f"{k} {ver[k]}" for k in PEERS if ver.get(k))
    lines.append(f"machine {mach['cpu']}, {mach['cores']} cores; numpy {ver['numpy']}, "
                 f"numba {ver['numba']}" + (f", {peers}" if peers else ""))
    fresh = ("a fresh run's first call" if c["mode"] == "sequence" else
             f"a fresh stream: created in {_fmt_us(o.get('stream_create_us', 0))} µs, first step")
    lines.append(f"ours    first call {o['first_call_s'] * 1e3:.1f} ms (JIT compile or Numba cache "
                 f"load); {fresh} {_fmt_us(o['cold_call_us'])} µs/step; steady state below")
    for key, label in (("cold_process_cached", "fresh process, warm Numba cache"),
                       ("cold_process_compile", "fresh process, empty Numba cache")):
        cp = o.get(key)
        if cp:
            if "error" in cp:
                lines.append(f"        {label}: failed: {cp['error']}")
            else:
                lines.append(f"        {label}: import {cp['import_s']:.2f} s, model "
                             f"{cp['model_s'] * 1e3:.0f} ms, first step {cp['first_step_s']:.2f} s")
    for note in res["notes"]:
        lines.append(f"note    {note}")
    unit = "per time step" if c["mode"] == "sequence" else "per step"
    lines.append("")
    lines.append(f"{c['steps']} timed calls per runtime in {c['rounds']} interleaved rounds, "
                 f"after {c['warmup']} warm-up calls; µs {unit}")
    batched = c["batch"] > 1
    head = (f"{'runtime':<20} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'steps/s':>11}"
            + (f" {'samples/s':>11}" if batched else "") + f" {'ratio':>7}")
    lines.append(head)
    lines.append("-" * len(head))
    for name, s in res["runtimes"].items():
        ratio = "" if s["kind"] == "bound" else f"{s['ratio_to_ours']:.2f}"
        flag = "  MISMATCH" if name in res["checks"] and not res["checks"][name]["ok"] else ""
        lines.append(f"{name:<20} {_fmt_us(s['p50_us']):>9} {_fmt_us(s['p90_us']):>9} "
                     f"{_fmt_us(s['p99_us']):>9} {_fmt_us(s['max_us']):>9} "
                     f"{s['steps_per_s']:>11,.0f}"
                     + (f" {s['samples_per_s']:>11,.0f}" if batched else "") + f" {ratio:>7}{flag}")
    lines.append("ratio = runtime p50 / lstm-cpu p50 (> 1: lstm-cpu is faster)")
    bwl = f"weights {bw['weight_bytes'] / 1e6:.2f} MB/step: lstm-cpu {bw['ours_gb_s']:.1f} GB/s"
    if bw["bound_gb_s"]:
        bwl += f"; numpy BLAS over the same weights {bw['bound_gb_s']:.1f} GB/s (in-run bound)"
    if bw["memory_copy_gb_s"]:
        bwl += f"; memory copy {bw['memory_copy_gb_s']:.1f} GB/s ({bw['memory_copy_mb']} MB, r+w)"
    lines.append(bwl)
    if c["batch"] > 1 and bw.get("ours_gflop_s"):
        # At batch N a step reuses each weight N times: arithmetic, not bandwidth, bounds it.
        fl = f"batch {c['batch']}: matrix products {bw['flops_per_step'] / 1e6:.1f} MFLOP/step: " \
             f"lstm-cpu {bw['ours_gflop_s']:.1f} GFLOP/s"
        if bw.get("bound_gflop_s"):
            fl += f"; numpy BLAS {bw['bound_gflop_s']:.1f} GFLOP/s"
        lines.append(fl)
    if res["mismatch"]:
        lines.append("!!! at least one peer computed different outputs: see MISMATCH above !!!")
    return "\n".join(lines)


def plot_latencies(res: Dict[str, object], path: str) -> Optional[str]:
    """Write per-runtime latency distributions to ``path``; return a note if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "skipped --plot: matplotlib is not installed (pip install matplotlib)"
    data = res["_durations_us"]
    c, m = res["config"], res["model"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, v in data.items():
        v = np.sort(np.asarray(v))  # (calls,) µs, ascending
        q = np.arange(1, v.size + 1) / v.size
        p50, p99 = np.percentile(v, 50), np.percentile(v, 99)
        line, = ax.plot(v, q, drawstyle="steps-post", linewidth=1.5,
                        label=f"{name}: p50 {p50:.1f}, p99 {p99:.1f} µs")
        # Tail view: the fraction of calls slower than x, on log-log axes.
        bx.plot(v, 1.0 - q + 1.0 / v.size, drawstyle="steps-post", color=line.get_color())
    unit = "µs per time step" if c["mode"] == "sequence" else "µs per step"
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel(unit)
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("fraction of calls at most x")
    ax.set_title("latency distribution (CDF)", fontsize=10)
    bx.set_yscale("log")
    bx.set_ylabel("fraction of calls slower than x")
    bx.set_title("tail", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"lstm-cpu bench: mode {c['mode']}, batch {c['batch']}, threads {c['threads']}, "
                 f"I={m['input_size']} H={m['hidden_size']} L={m['num_layers']}; "
                 f"{c['steps']} calls per runtime, interleaved", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def public_result(res: Dict[str, object]) -> Dict[str, object]:
    """The result without the raw per-call durations (kept only for the plot)."""
    return {k: v for k, v in res.items() if not k.startswith("_")}


__all__ = [
    "BenchConfig", "PEERS", "MODES", "TOLERANCE", "DEFAULT_SIZE", "PeerUnavailable",
    "run_bench", "format_report", "plot_latencies", "public_result", "embedded_layers",
    "embedded_model", "machine_info", "versions", "installed_peers", "memory_bandwidth",
    "OursRunner", "OnnxRuntimeRunner", "TorchRunner", "OpenVINORunner", "BoundRunner",
    "LSTMError",
]
