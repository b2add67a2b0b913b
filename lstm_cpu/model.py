"""The public model and stream objects: validate at the boundary, then call the trusting kernels.

A :class:`LSTMModel` is immutable after construction (its packed buffers are read-only arrays) and
can be shared by any number of :class:`Stream` objects, in any threads. A stream owns only its
state and scratch, so stepping allocates nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np

from . import _config, kernels
from . import layout as lay
from .errors import InputError, InputTypeError, UnsupportedModelError
from .spec import ACTIVATIONS, Activation, LayerParams, as_activations

_CODE_TO_NAME = {v[0]: k for k, v in ACTIVATIONS.items()}

#: Streams whose model has at least this many weight bytes use the parallel kernel by default.
#: Measured on 2 cores (bench/results.md, "crossover"): at 0.4 MB parallel is 1.5x slower, at
#: 3.7 MB a tie, at 14.7 MB 2.5x faster. Below it, waking a thread costs more than it saves; and
#: on a loaded box a parallel step waits for a descheduled worker (1-16 ms seen), so only models
#: large enough to gain a lot use it by default.
PARALLEL_MIN_WEIGHT_BYTES = 8 << 20

_KERNELS = ("auto", "serial", "parallel")

#: A batched stream (2 <= N < BLAS_MIN_BATCH) of an "auto" model uses the parallel kernel once
#: its weight bytes x N (the bytes its step streams through the product) reach this: its tasks
#: are (group of four streams, chunk), so even an unsplit model has N/4 of them. Measured on 2
#: cores, serial vs parallel us per step: (32,64,1) N=16 34/33, N=32 44/28; (64,128,1) N=8
#: 33/33, N=16 64/59, N=32 148/98; (128,256,2) N=4 145/121, N=32 972/547.
BATCH_PARALLEL_MIN_BYTES = 2 << 20

#: From this many streams (or sequences in a batch) up, the gate products are numpy BLAS matrix
#: products; below it, Numba's fused kernel runs them four streams at a time (no Python between
#: layers or time steps, and one stream's result is bit-identical whatever the batch). Measured on
#: this 2-core box (bench/results.md, "batched product"): Numba's product 62-70 GFLOP/s vs
#: OpenBLAS 49 at 16 streams, a tie at 32, OpenBLAS 1.4x-1.8x ahead at 48 and 64.
BLAS_MIN_BATCH = 40

#: numpy's array flag bits (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE, stable
#: C API values): an array with all three has the exact Numba type the compiled step takes. One
#: ``flags.num`` read replaces three flag lookups on the hot path.
_KERNEL_FLAGS = 0x0001 | 0x0100 | 0x0400


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _as_float_array(x, dtype, what: str) -> np.ndarray:
    """Convert any real numeric array-like to a C-contiguous ``dtype`` array, or raise TypeError."""
    if isinstance(x, np.ndarray) and x.dtype == dtype and x.flags.c_contiguous:
        return x
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InputTypeError(f"{what} must be a numeric array, got {type(x).__name__}: {e}") from None
    if a.dtype.kind not in "biuf":
        raise InputTypeError(f"{what} must have a real numeric dtype, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _check_weight(a, shape, what):
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise InputTypeError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise InputError(f"{what}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} contains NaN or Inf; weights must be finite")
    return a


class LSTMModel:
    """An immutable, packed LSTM stack. Build it with an importer or from canonical params.

    Args:
        layers: ``layers[l][d]`` are :class:`~lstm_cpu.spec.LayerParams` for layer l, direction d
            (1 or 2 directions), canonical gate order. Every layer has the same H and P.
        clip: cell clip (ONNX ``clip``), or None.
        input_forget: couple the input gate to the forget gate, ``i = 1 - f``.
        dtype: ``np.float32`` (default; rational tanh/sigmoid, max abs error ~2e-7) or
            ``np.float64`` (libm).
        initial_state: ``(h0 (L*D, out), c0 (L*D, H))`` the model starts from, or None for zeros.
        head: ``(weight (O, D*out), bias (O,) or None)``: a linear layer applied to every output.
        source: provenance shown by :meth:`info`.
        kernel: "auto" (serial below PARALLEL_MIN_WEIGHT_BYTES, else parallel), "serial" or
            "parallel": the default for this model's streams and runs. Only a model that will
            run in parallel ("parallel", or "auto" from that size) is split into one column
            chunk per thread; others are packed as one chunk, the fastest serial form, and a
            parallel kernel asked for later has nothing to split.
        reverse: a one-direction model that runs backwards in time (ONNX ``direction="reverse"``);
            it needs whole sequences (``run``), like a bidirectional one.

    Semantics that follow onnxruntime: ``input_forget`` sets ``f = 1 - i``; in ``run`` with
    ``lengths``, a sequence of length 0 ends in a zero state.
    """

    def __init__(self, layers: Sequence[Sequence[LayerParams]], *, clip=None, input_forget=False,
                 dtype=np.float32, initial_state=None, head=None, source=None, kernel="auto",
                 reverse=False):
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InputError(f"dtype must be float32 or float64, got {dtype}")
        if kernel not in _KERNELS:
            raise InputError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
        layers = [list(row) for row in layers]
        self._validate(layers, clip, head)
        if reverse and len(layers[0]) != 1:
            raise InputError("reverse=True is for one-direction models; a bidirectional model "
                             "already has a backward direction")
        if clip is not None and not clip:
            clip = None
        p0 = layers[0][0]
        L, D = len(layers), len(layers[0])
        H, out = p0.hidden_size, p0.output_size
        for row in layers:
            for p in row:
                p.activations = as_activations(p.activations)
        # Column chunks only pay off for the parallel kernel: serially, one chunk streams the
        # weights fastest (measured: a (128,256,2) sequence step 50.5 us with 1 chunk, 58.2 with
        # 2). So a model is split into one chunk per thread only if it will run in parallel.
        fused_bytes = sum(4 * H * (np.shape(p.w_ih)[1] + np.shape(p.w_hh)[1]) for row in layers
                          for p in row) * dtype.itemsize
        will_parallel = kernel == "parallel" or (kernel == "auto" and fused_bytes >= PARALLEL_MIN_WEIGHT_BYTES)
        wbuf, meta, fpar = lay.pack(layers, clip=clip, input_forget=input_forget, dtype=dtype, head=head,
                                    n_threads=_config.num_threads() if will_parallel else 1,
                                    reverse=bool(reverse))
        init = None
        if initial_state is not None:
            h0, c0 = initial_state
            init = (_check_weight(h0, (L * D, out), "initial_state h0").astype(dtype),
                    _check_weight(c0, (L * D, H), "initial_state c0").astype(dtype))
        self._set_packed(wbuf, meta, fpar, init, dict(source or {}), kernel)

    # -- construction from already-packed buffers (used by packed.load) -----------------------
    @classmethod
    def _from_packed(cls, wbuf, meta, fpar, initial_state, source, kernel="auto"):
        self = cls.__new__(cls)
        self._set_packed(wbuf, meta, fpar, initial_state, source, kernel)
        return self

    def _set_packed(self, wbuf, meta, fpar, init, source, kernel):
        self._wbuf = _readonly(wbuf)  # (total,) packed weights, see layout.py
        self._meta = _readonly(meta)  # (M_LD + L*D*LD_STRIDE,) int64 sizes and offsets
        self._fpar = _readonly(fpar)  # (F_LD + L*D*F_STRIDE,) float64 clip and activation params
        self._init = None if init is None else tuple(_readonly(np.ascontiguousarray(a)) for a in init)
        self._source = source
        self._kernel = kernel
        m = meta
        self.input_size = int(m[lay.M_I])
        self.hidden_size = int(m[lay.M_H])
        self.proj_size = int(m[lay.M_P])
        self.num_layers = int(m[lay.M_L])
        self.num_directions = int(m[lay.M_D])
        self._out = int(m[lay.M_OUT])
        self._head_o = int(m[lay.M_HEAD_O])
        self.output_size = self._head_o or self.num_directions * self._out
        self.dtype = wbuf.dtype

    @staticmethod
    def _validate(layers, clip, head):
        if not layers or not all(len(row) in (1, 2) for row in layers):
            raise InputError("layers must be a non-empty list of per-layer lists of 1 or 2 directions")
        D = len(layers[0])
        if any(len(row) != D for row in layers):
            raise InputError("every layer must have the same number of directions")
        p0 = layers[0][0]
        if np.ndim(p0.w_ih) != 2 or np.shape(p0.w_ih)[0] % 4 or np.shape(p0.w_ih)[0] == 0:
            raise InputError(f"layer 0 w_ih: expected shape (4H, in) with H > 0, got {np.shape(p0.w_ih)}")
        H = p0.hidden_size
        P = 0 if p0.w_hr is None else int(np.shape(p0.w_hr)[0])
        out = P or H
        for l, row in enumerate(layers):
            for d, p in enumerate(row):
                where = f"layer {l} direction {d}"
                fan_in = p0.input_size if l == 0 else D * out
                _check_weight(p.w_ih, (4 * H, fan_in), f"{where} w_ih")
                _check_weight(p.w_hh, (4 * H, out), f"{where} w_hh")
                if p.bias is not None:
                    _check_weight(p.bias, (4 * H,), f"{where} bias")
                if (p.w_hr is None) != (P == 0):
                    raise InputError(f"{where}: every layer must have a projection, or none")
                if p.w_hr is not None:
                    _check_weight(p.w_hr, (P, H), f"{where} w_hr")
                if p.peephole is not None:
                    _check_weight(p.peephole, (3 * H,), f"{where} peephole")
        if clip is not None and not (np.isfinite(clip) and clip >= 0):
            raise InputError(f"clip must be a finite non-negative number, got {clip!r}")
        if head is not None:
            hw, hb = head
            hw = np.asarray(hw)
            if hw.ndim != 2 or hw.shape[0] == 0:
                raise InputError(f"head weight: expected shape (O, {D * out}), got {hw.shape}")
            _check_weight(hw, (hw.shape[0], D * out), "head weight")
            if hb is not None:
                _check_weight(hb, (hw.shape[0],), "head bias")

    # -- introspection -------------------------------------------------------------------------
    @property
    def clip(self) -> Optional[float]:
        v = float(self._fpar[lay.F_CLIP])
        return v if v > 0 else None

    @property
    def input_forget(self) -> bool:
        return bool(self._meta[lay.M_COUPLED])

    @property
    def reverse(self) -> bool:
        """True for a one-direction model that runs backwards in time."""
        return bool(self._meta[lay.M_REVERSE])

    @property
    def initial_state(self):
        """``(h0 (L*D, out), c0 (L*D, H))`` copies, or None when the model starts from zeros."""
        return None if self._init is None else (self._init[0].copy(), self._init[1].copy())

    @property
    def head(self):
        """``(weight (O, D*out), bias (O,))`` copies, or None."""
        if not self._head_o:
            return None
        O, w0, b0 = self._head_o, int(self._meta[lay.M_HEAD_W]), int(self._meta[lay.M_HEAD_B])
        Dout = self.num_directions * self._out
        return (self._wbuf[w0 : w0 + Dout * O].reshape(Dout, O).T.copy(), self._wbuf[b0 : b0 + O].copy())

    @property
    def weight_bytes(self) -> int:
        return int(self._wbuf.nbytes)

    @property
    def default_kernel(self) -> str:
        """The kernel "auto" resolves to for this model."""
        if self._kernel != "auto":
            return self._kernel
        if int(self._meta[lay.M_N]) > 1 and self.weight_bytes >= PARALLEL_MIN_WEIGHT_BYTES:
            return "parallel"
        return "serial"

    def activations(self, layer=0, direction=0):
        rec = lay.M_LD + (layer * self.num_directions + direction) * lay.LD_STRIDE
        frec = lay.F_LD + (layer * self.num_directions + direction) * lay.F_STRIDE
        return tuple(
            Activation(_CODE_TO_NAME[int(self._meta[rec + lay.LD_ACT + j])],
                       float(self._fpar[frec + 2 * j]), float(self._fpar[frec + 2 * j + 1]))
            for j in range(3))

    def layer_params(self):
        """The canonical weights, unpacked (float64 copies): ``[[LayerParams per direction] per layer]``."""
        rows = []
        wbuf = self._wbuf.astype(np.float64)  # once, not per layer and direction
        for l in range(self.num_layers):
            row = []
            for d in range(self.num_directions):
                w_cat, bias, peep, w_hr = lay.unpack_layer(wbuf, self._meta, l, d)
                fan_in = w_cat.shape[1] - self._out
                row.append(LayerParams(w_cat[:, :fan_in].copy(), w_cat[:, fan_in:].copy(), bias.copy(),
                                       None if w_hr is None else w_hr.copy(),
                                       None if peep is None else peep.copy(),
                                       self.activations(l, d)))
            rows.append(row)
        return rows

    def parameter_count(self) -> int:
        H, out, L, D = self.hidden_size, self._out, self.num_layers, self.num_directions
        n = 0
        for l in range(L):
            fan_in = self.input_size if l == 0 else D * out
            per = 4 * H * (fan_in + out) + 4 * H
            if self.proj_size:
                per += self.proj_size * H
            if self._meta[lay.M_PEEP]:
                per += 3 * H
            n += D * per
        if self._head_o:
            n += self._head_o * (D * out + 1)
        return n

    def info(self) -> dict:
        """Sizes, activations, parameter count, weight bytes and provenance, JSON-ready."""
        return {
            "source": dict(self._source),
            "format": self._source.get("format", "memory"),
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "proj_size": self.proj_size,
            "num_layers": self.num_layers,
            "num_directions": self.num_directions,
            "output_size": self.output_size,
            "head_size": self._head_o,
            "activations": [[[a.name, a.alpha, a.beta] for a in self.activations(l, d)]
                            for l in range(self.num_layers) for d in range(self.num_directions)],
            "clip": self.clip,
            "input_forget": self.input_forget,
            "reverse": self.reverse,
            "peepholes": bool(self._meta[lay.M_PEEP]),
            "has_initial_state": self._init is not None,
            "dtype": str(self.dtype),
            "parameters": self.parameter_count(),
            "weight_bytes": self.weight_bytes,
            "chunks": int(self._meta[lay.M_N]),
            "kernel": self.default_kernel,
        }

    def __repr__(self):
        return (f"LSTMModel(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"proj_size={self.proj_size}, num_layers={self.num_layers}, "
                f"num_directions={self.num_directions}, output_size={self.output_size}, dtype={self.dtype})")

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, batch: Optional[int] = None, kernel: Optional[str] = None) -> "Stream":
        """A new stream (batch=None) or N streams stepped together (batch=N), at the initial state."""
        if self.num_directions != 1 or self.reverse:
            raise UnsupportedModelError(
                "streaming needs a forward model: a bidirectional or reverse LSTM reads the "
                "sequence backwards, so it needs the whole sequence; use model.run(x) instead")
        return Stream(self, batch, kernel)

    def save(self, path) -> None:
        """Write the packed model to ``path`` atomically (see :mod:`lstm_cpu.packed`)."""
        from .packed import save

        save(self, path)

    # -- whole sequences -------------------------------------------------------------------------
    def _stream_kernel(self, kernel, N: int) -> str:
        """The kernel a stream of N (batch) streams runs: ``kernel``, or the model's default,
        except that "auto" goes parallel for a batch with enough work per step."""
        name = self._kernel_name(kernel)
        if ((kernel is None or kernel == "auto") and self._kernel == "auto"
                and 2 <= N < BLAS_MIN_BATCH and _config.num_threads() > 1
                and self.weight_bytes * N >= BATCH_PARALLEL_MIN_BYTES):
            return "parallel"
        return name

    def _kernel_name(self, kernel):
        if kernel is None or kernel == "auto":
            return self.default_kernel
        if kernel not in _KERNELS:
            raise InputError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
        return kernel

    def run(self, x, state=None, lengths=None, kernel=None):
        """Run a whole sequence, time-major.

        x (T, I) or (T, B, I); state ``(h (L*D, [B,] out), c (L*D, [B,] H))`` or None for the
        model's initial state; lengths (B,) valid steps per sequence (ONNX ``sequence_lens``),
        or None for all T. Returns ``y (T, [B,] D*out or O)`` and the final ``(h, c)``.
        Outputs past a sequence's length are zero and its final state is the state at its
        last valid step; the reverse direction starts from that step.
        ``kernel``: whole sequences run the serial kernel unless "parallel" is asked for here or
        at construction (next to BLAS calls the parallel kernel loses, see the code).
        """
        x = _as_float_array(x, self.dtype, "x")
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            raise InputError(f"x: expected shape (T, {self.input_size}) or (T, B, {self.input_size}), "
                             f"got {x.shape}")
        batched = x.ndim == 3
        xb = x if batched else x[:, None, :]
        T, B = xb.shape[0], xb.shape[1]
        L, D, H, out = self.num_layers, self.num_directions, self.hidden_size, self._out
        h0, c0 = self._initial_batch(state, B, batched)
        lens = self._lengths(lengths, T, B, batched)
        meta = self._meta
        n, C, Hp = int(meta[lay.M_N]), int(meta[lay.M_C]), int(meta[lay.M_HP])
        # "auto" runs whole sequences serially: the input projection is a BLAS call, and numpy's
        # OpenBLAS workers keep spinning after each call, starving Numba's workers (measured on 2
        # cores: the parallel kernel made a (256,512,2) sequence 2.5x slower at batch 1).
        self._kernel_name(kernel)  # validates
        parallel = (kernel or self._kernel) == "parallel"  # only when asked for explicitly
        fn = kernels.layer_sequence_parallel if parallel else kernels.layer_sequence_serial
        use_blas = B >= BLAS_MIN_BATCH  # the recurrent products by BLAS, one per step and chunk
        acc = np.empty((n, B, C), self.dtype)  # (n, B, C) gate pre-activations per chunk
        mb = np.empty((B, Hp), self.dtype)  # (B, Hp) o * h_act(c) before the projection
        hN = np.empty((L * D, B, out), self.dtype)
        cN = np.empty((L * D, B, H), self.dtype)
        inp = xb  # (T, B, fan_in)
        for l in range(L):
            y = np.zeros((T, B, D * out), self.dtype)  # (T, B, D*out) direction d: columns d*out..
            for d in range(D):
                rec = lay.M_LD + (l * D + d) * lay.LD_STRIDE
                K = int(meta[rec + lay.LD_K])
                kin = K - out
                w = self._wbuf[meta[rec + lay.LD_W] : meta[rec + lay.LD_W] + n * K * C].reshape(n, K, C)
                # The input projection of the whole sequence as one matrix product per chunk (the
                # kernel adds the bias as it reads xp: no extra pass over T*B*n*C floats).
                flat = inp.reshape(T * B, kin)
                if n == 1:
                    xp = np.matmul(flat, w[0, :kin, :]).reshape(T, B, C)  # (T, B, C)
                else:
                    xp = np.empty((T, B, n * C), self.dtype)  # (T, B, n*C) packed column order
                    for b in range(n):
                        np.matmul(flat, w[b, :kin, :], out=xp.reshape(T * B, n * C)[:, b * C:(b + 1) * C])
                h = np.array(h0[l * D + d], order="C")  # (B, out) a copy: never the caller's array
                c = np.zeros((B, Hp), self.dtype)  # (B, Hp) padded cell state
                c[:, :H] = c0[l * D + d]
                if use_blas:  # serial cell updates: never Numba threads next to BLAS calls
                    w_rec = w[:, kin:, :]  # (n, out, C) recurrent rows of each chunk
                    args = (xp, self._wbuf, meta, self._fpar, l, d, lens, h, c, y, acc, mb)
                    call = kernels.compiled_entry(kernels.sequence_cells_serial, (0,) + args)
                    backward = d == 1 or self.reverse
                    for step in range(T):
                        t = T - 1 - step if backward else step
                        for b in range(n):
                            np.matmul(h, w_rec[b], out=acc[b])  # (B, out) @ (out, C)
                        call(t, *args)
                else:
                    with (_config.parallel_guard() if parallel else nullcontext()):
                        fn(xp, self._wbuf, meta, self._fpar, l, d, lens, h, c, y, acc, mb)
                hN[l * D + d], cN[l * D + d] = h, c[:, :H]
            empty = lens == 0  # onnxruntime: a sequence of length 0 ends in a zero state
            if empty.any():
                hN[l * D:(l + 1) * D, empty] = 0
                cN[l * D:(l + 1) * D, empty] = 0
            inp = y
        y = inp
        if self._head_o:
            hw, hb = self.head
            y = (y.reshape(T * B, D * out) @ hw.T.astype(self.dtype)
                 + hb.astype(self.dtype)).reshape(T, B, self._head_o)
            if lengths is not None:
                y[np.arange(T)[:, None] >= lens[None, :]] = 0
        if not batched:
            return y[:, 0, :], (hN[:, 0, :], cN[:, 0, :])
        return y, (hN, cN)

    def _initial_batch(self, state, B, batched):
        """(h0 (L*D, B, out), c0 (L*D, B, H)) from the caller's state, the model's, or zeros."""
        LD, out, H = self.num_layers * self.num_directions, self._out, self.hidden_size
        if state is None:
            if self._init is None:
                return np.zeros((LD, B, out), self.dtype), np.zeros((LD, B, H), self.dtype)
            return (np.repeat(self._init[0][:, None, :], B, axis=1),
                    np.repeat(self._init[1][:, None, :], B, axis=1))
        try:
            h, c = state
        except (TypeError, ValueError):
            raise InputError("state must be a pair (h, c)") from None
        h = _as_float_array(h, self.dtype, "state h")
        c = _as_float_array(c, self.dtype, "state c")
        want_h = (LD, B, out) if batched else (LD, out)
        want_c = (LD, B, H) if batched else (LD, H)
        if h.shape != want_h:
            raise InputError(f"state h: expected shape {want_h}, got {h.shape}")
        if c.shape != want_c:
            raise InputError(f"state c: expected shape {want_c}, got {c.shape}")
        if not batched:
            h, c = h[:, None, :], c[:, None, :]
        return h, c

    @staticmethod
    def _lengths(lengths, T, B, batched):
        if lengths is None:
            return np.full(B, T, dtype=np.int64)
        a = np.asarray(lengths)
        if a.dtype.kind not in "iu":
            if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
                a = a.astype(np.int64)
            else:
                raise InputTypeError(f"lengths must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1) if (not batched and a.ndim == 0) else a.astype(np.int64)
        if a.shape != (B,):
            raise InputError(f"lengths: expected shape ({B},), got {a.shape}")
        if np.any(a < 0) or np.any(a > T):
            raise InputError(f"lengths must be within [0, {T}], got min {a.min()} max {a.max()}")
        return np.ascontiguousarray(a)


class Stream:
    """Persistent state for one stream (batch=None) or N streams stepped together (batch=N).

    Owns ``h``, ``c`` and scratch in one buffer; shares the model's weights read-only. A stream
    is not itself thread-safe (one thread steps it at a time), but any number of streams of one
    model may step concurrently in different threads.
    """

    def __init__(self, model: LSTMModel, batch: Optional[int] = None, kernel: Optional[str] = None):
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
                raise InputError(f"batch must be a positive integer or None, got {batch!r}")
            batch = int(batch)
        self.model = model
        self.batch = batch
        self.kernel = model._stream_kernel(kernel, 1 if batch is None else batch)
        N = 1 if batch is None else batch
        self._N = N
        meta = model._meta
        h_off, c_off, z_off, acc_off, _m, end = (int(v) for v in lay.sbuf_offsets(meta, N))
        self._sbuf = np.zeros(end, model.dtype)  # state and scratch, see layout.py
        L, out, Hp = model.num_layers, model._out, int(meta[lay.M_HP])
        self._h = self._sbuf[h_off:c_off].reshape(L, N, out)  # (L, N, out) view
        self._c = self._sbuf[c_off:z_off].reshape(L, N, Hp)  # (L, N, Hp) view
        self._x = np.zeros(N * model.input_size, model.dtype)  # (N*I,) conversion buffer
        parallel = self.kernel == "parallel"
        self._step_fn = kernels.stack_step_parallel if parallel else kernels.stack_step_serial
        self._run_fn = kernels.stack_run_parallel if parallel else kernels.stack_run_serial
        self._guard = _config.parallel_guard if parallel else None
        self._blas = N >= BLAS_MIN_BATCH
        if self._blas:
            # Views for the BLAS path: per layer z (N, K_l), the chunks' W (n, K_l, C), acc (n, N, C).
            # Its cell updates stay serial even for a parallel stream: numpy's OpenBLAS workers
            # spin after each product and starve Numba's (a 64-stream (256,512,2) step took 20 ms
            # with parallel cell updates on 2 cores).
            n, C = int(meta[lay.M_N]), int(meta[lay.M_C])
            self._acc = self._sbuf[acc_off : acc_off + n * N * C].reshape(n, N, C)
            self._layers = []
            for l in range(L):
                rec = lay.M_LD + l * lay.LD_STRIDE
                K, w0 = int(meta[rec + lay.LD_K]), int(meta[rec + lay.LD_W])
                self._layers.append((self._sbuf[z_off : z_off + N * K].reshape(N, K),
                                     model._wbuf[w0 : w0 + n * K * C].reshape(n, K, C)))
        # Precomputed for the hot path: kernels take flat x (N*I,) and y (N*O,), stream-major.
        self._dtype = np.dtype(model.dtype)
        self._single = batch is None
        self._want = (model.input_size,) if batch is None else (N, model.input_size)
        self._yshape = (model.output_size,) if batch is None else (N, model.output_size)
        self._ylen = N * model.output_size
        self._wargs = (model._wbuf, model._meta, model._fpar, self._sbuf)
        # The compiled kernel for exactly these argument types: step() guarantees them, so the
        # per-call type dispatch of Numba (~1 us, a third of a small model's step) is skipped.
        self._step_call = kernels.compiled_entry(
            self._step_fn, (self._x, *self._wargs, np.empty(self._ylen, self._dtype)))
        if self._blas:  # the BLAS path's three kernels, resolved once for the same reason
            y0 = np.empty(self._ylen, self._dtype)
            self._blas_calls = (
                kernels.compiled_entry(kernels.batch_load_z, (0, self._x, self._sbuf, meta)),
                kernels.compiled_entry(kernels.batch_cells_serial,
                                       (0, N, model._wbuf, meta, model._fpar, self._sbuf)),
                kernels.compiled_entry(kernels.batch_emit, (N, model._wbuf, meta, self._sbuf, y0)))
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Return to the model's initial state (zeros unless the model carries one)."""
        H = self.model.hidden_size
        self._h[...] = 0
        self._c[...] = 0
        if self.model._init is not None:
            self._h[...] = self.model._init[0][:, None, :]
            self._c[:, :, :H] = self.model._init[1][:, None, :]

    @property
    def state(self):
        """``(h (L, out), c (L, H))``, or ``(L, N, out)``, ``(L, N, H)`` for batch N: copies."""
        H = self.model.hidden_size
        h, c = self._h.copy(), self._c[:, :, :H].copy()
        if self.batch is None:
            return h[:, 0, :], c[:, 0, :]
        return h, c

    @state.setter
    def state(self, value):
        try:
            h, c = value
        except (TypeError, ValueError):
            raise InputError("state must be a pair (h, c)") from None
        m = self.model
        L, out, H = m.num_layers, m._out, m.hidden_size
        want_h = (L, out) if self.batch is None else (L, self._N, out)
        want_c = (L, H) if self.batch is None else (L, self._N, H)
        h = _as_float_array(h, m.dtype, "state h")
        c = _as_float_array(c, m.dtype, "state c")
        if h.shape != want_h:
            raise InputError(f"state h: expected shape {want_h}, got {h.shape}")
        if c.shape != want_c:
            raise InputError(f"state c: expected shape {want_c}, got {c.shape}")
        self._h[...] = h.reshape(L, self._N, out)
        self._c[...] = 0
        self._c[:, :, :H] = c.reshape(L, self._N, H)

    # -- stepping ------------------------------------------------------------------------------
    def step(self, x, out=None):
        """One sample per stream: x (I,) -> y (out,), or (N, I) -> (N, out) for batch N.

        Returns a new array, or writes into ``out`` (a writable C-contiguous array of the model's
        dtype and the output's shape) and returns it: with ``out`` a step allocates nothing.
        """
        # The hot path: a writable, contiguous array of the right dtype and shape goes straight
        # to the kernel (a read-only one would be a new Numba type: it is copied instead).
        if type(x) is np.ndarray and x.dtype is self._dtype and x.shape == self._want:
            if x.flags.num & _KERNEL_FLAGS == _KERNEL_FLAGS:
                xk = x if self._single else x.reshape(-1)
            else:
                xk = self._x
                xk[:] = x.reshape(-1)
        else:
            xa = _as_float_array(x, self._dtype, "x")
            if xa.shape != self._want:
                raise InputError(f"x: expected shape {self._want}, got {xa.shape}")
            xk = self._x
            xk[:] = xa.reshape(-1)
        if out is None:
            y = np.empty(self._ylen, self._dtype)  # the kernel writes the result straight here
            ret = y if self._single else y.reshape(self._yshape)
        else:
            if not (type(out) is np.ndarray and out.dtype is self._dtype and out.shape == self._yshape
                    and out.flags.num & _KERNEL_FLAGS == _KERNEL_FLAGS):
                raise InputError(
                    f"out: expected a writable C-contiguous {self._dtype} array of shape "
                    f"{self._yshape}, got {getattr(out, 'dtype', type(out).__name__)} "
                    f"{getattr(out, 'shape', '')}")
            y = out if self._single else out.reshape(-1)
            ret = out
        if self._blas:
            self._step_blas(xk, y)
        elif self._guard is None:
            self._step_call(xk, *self._wargs, y)
        else:
            with self._guard():
                self._step_call(xk, *self._wargs, y)
        return ret

    def _step_blas(self, xk, y):
        """One step of N >= BLAS_MIN_BATCH streams: the gate products as BLAS matrix products.

        xk (N*I,) inputs, y (N*O,) outputs."""
        m = self.model
        wbuf, meta, fpar, sbuf, N = m._wbuf, m._meta, m._fpar, self._sbuf, self._N
        load_z, cells, emit = self._blas_calls
        for l, (z, w) in enumerate(self._layers):
            load_z(l, xk, sbuf, meta)
            for b in range(w.shape[0]):
                np.matmul(z, w[b], out=self._acc[b])  # (N, K) @ (K, C) -> (N, C)
            cells(l, N, wbuf, meta, fpar, sbuf)
        emit(N, wbuf, meta, sbuf, y)

    def run(self, xs):
        """A chunk of samples: xs (T, I) -> (T, out), or (T, N, I) -> (T, N, out); state carries."""
        m = self.model
        N, I = self._N, m.input_size
        xa = _as_float_array(xs, self._dtype, "xs")
        want = "(T, %d)" % I if self.batch is None else "(T, %d, %d)" % (N, I)
        if (xa.ndim != 2 or xa.shape[1] != I) if self.batch is None else (xa.ndim != 3 or xa.shape[1:] != (N, I)):
            raise InputError(f"xs: expected shape {want}, got {xa.shape}")
        if not xa.flags.writeable:  # a read-only array would be a new Numba type
            xa = xa.copy()
        T = xa.shape[0]
        xk = xa.reshape(T, N * I)  # (T, N*I)
        ys = np.empty((T, self._ylen), self._dtype)  # (T, N*O)
        if T and self._blas:
            for t in range(T):
                self._step_blas(xk[t], ys[t])
        elif T:
            if self._guard is None:
                self._run_fn(xk, *self._wargs, ys)
            else:
                with self._guard():
                    self._run_fn(xk, *self._wargs, ys)
        return ys.reshape((T,) + self._yshape)

    def __repr__(self):
        return f"Stream(batch={self.batch}, kernel={self.kernel!r}, model={self.model!r})"
