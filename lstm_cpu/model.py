"""The public model and stream objects: validate at the boundary, then call the trusting kernels.

A :class:`LSTMModel` is immutable after construction (its packed buffers are read-only arrays) and
can be shared by any number of :class:`Stream` objects, in any threads. A stream owns only its
state and scratch, so stepping allocates nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np

from . import _config, aligned, kernels, policy
from . import layout as lay
from . import quant
from .errors import InputError, InputTypeError, UnsupportedModelError
from .spec import ACTIVATIONS, Activation, LayerParams, as_activations
from .team import new_sync

_CODE_TO_NAME = {v[0]: k for k, v in ACTIVATIONS.items()}

#: numpy's array flag bits (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE, stable
#: C API values): an array with all three has the exact Numba type the compiled step takes. One
#: ``flags.num`` read replaces three flag lookups on the hot path.
_KERNEL_FLAGS = 0x0001 | 0x0100 | 0x0400


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _maps_a_file(a) -> bool:
    """Whether ``a``'s memory is a memory-mapped file (``packed.load(mmap=True)``)."""
    import mmap

    seen = 0
    while a is not None and seen < 16:  # base chain: arrays, then a memoryview of the map
        if isinstance(a, mmap.mmap):
            return True
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
        seen += 1
    return False


def _placed(wbuf: np.ndarray) -> np.ndarray:
    """``wbuf`` with its gate matrices on 64-byte boundaries (``aligned.py``): a copy where
    they are not, except a mapped file's buffer, which stays shared (files that ``save`` wrote
    are aligned; older ones run as they are, correct and a little slower)."""
    if aligned.is_aligned(wbuf, lay.W_CONSTS) or _maps_a_file(wbuf):
        return wbuf
    return aligned.aligned(wbuf, lay.W_CONSTS)


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
        input_forget: couple the forget gate to the input gate, ``f = 1 - i`` (ONNX
            ``input_forget=1`` as onnxruntime computes it).
        dtype: ``np.float32`` (default; rational tanh/sigmoid, max abs error ~2e-7) or
            ``np.float64`` (libm).
        initial_state: ``(h0 (L*D, out), c0 (L*D, H))`` the model starts from, or None for zeros.
        head: ``(weight (O, D*out), bias (O,) or None)``: a linear layer applied to every output.
        source: provenance shown by :meth:`info`.
        kernel: "auto", "serial" or "parallel": the default request for this model's streams
            and runs; :func:`lstm_cpu.policy.choose_kernel` turns it into a kernel. The packed
            weights do not depend on it (nor on the machine): parallel kernels split the hidden
            units across threads at run time, with the same bits as the serial kernel.
        reverse: a one-direction model that runs backwards in time (ONNX ``direction="reverse"``);
            it needs whole sequences (``run``), like a bidirectional one.
        weights: the format of the gate matrices, ``"float32"`` (default), ``"int8"`` (symmetric,
            one scale per gate row over the fused [w_ih | w_hh] row) or ``"bfloat16"`` (round to
            nearest even). Activations, state and outputs stay float32; biases, peepholes,
            projection and head stay float. A model with default activations and no peepholes,
            projection, head, clip or coupling runs the reduced kernels
            (``lstm_cpu/kernels_quant.py``: int8 with per-step 16-bit activations on AVX-512
            VNNI, bfloat16 with ``vdpbf16ps``) for its streams, lone or batched, and ``run``
            (one or two directions); a stream gets the same bits in any batch, chunk or ``run``.
            Such a model holds only its reduced gate matrices. Everything else, and
            ``kernel="parallel"``, runs the float kernels over the weights the reduced ones
            stand for (same values, ~1e-5 apart from the reduced kernels' activation rounding),
            built in float32 when first needed. ``model.weight_error`` is the max abs output
            error against the float32 model over a fixed random 1,000-step stream, measured here.
        reduced: internal: per (layer, direction) :class:`lstm_cpu.quant.ReducedLayer` already
            reduced (a packed file, an imported quantized node); ``layers`` then supplies the rest.
        weight_error: internal: the stored conversion error (a packed file).

    Semantics that follow onnxruntime: ``input_forget`` sets ``f = 1 - i``; in ``run`` with
    ``lengths``, a sequence of length 0 ends in a zero state.
    """

    def __init__(self, layers: Sequence[Sequence[LayerParams]], *, clip=None, input_forget=False,
                 dtype=np.float32, initial_state=None, head=None, source=None, kernel="auto",
                 reverse=False, weights="float32", reduced=None, weight_error=None):
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InputError(f"dtype must be float32 or float64, got {dtype}")
        weights = quant.check_format(weights)
        if weights != "float32" and dtype != np.dtype(np.float32):
            raise InputError(f"weights={weights!r} computes in float32; dtype={dtype} is not available with it")
        kernel = policy.check_requested(kernel)
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
        reference = None
        if weights == "float32":
            reduced = weight_error = None
        else:
            if reduced is None:
                reference = layers
                reduced = [[quant.ReducedLayer.convert(p.w_ih, p.w_hh, weights) for p in row] for row in layers]
            # the float kernels run what the reduced weights stand for
            layers = [[LayerParams(*q.weights(), p.bias, p.w_hr, p.peephole, p.activations)
                       for p, q in zip(row, qrow)] for row, qrow in zip(layers, reduced)]
        plan, wbuf, fpar = lay.pack(layers, clip=clip, input_forget=input_forget, dtype=dtype,
                                    head=head, reverse=bool(reverse))
        init = None
        if initial_state is not None:
            h0, c0 = initial_state
            init = (_check_weight(h0, (L * D, out), "initial_state h0").astype(dtype),
                    _check_weight(c0, (L * D, H), "initial_state c0").astype(dtype))
        self._set_packed(plan, wbuf, fpar, init, dict(source or {}), kernel, weights, reduced, weight_error)
        if reference is not None:  # measured once, at conversion (a packed file keeps it)
            ref = LSTMModel(reference, clip=clip, input_forget=input_forget, initial_state=initial_state,
                            head=head, reverse=reverse)
            self.weight_error = quant.error_estimate(ref, self)

    def with_weights(self, weights: str) -> "LSTMModel":
        """This model with its gate matrices in another format (``quant.FORMATS``); the same
        model when it already has that format. Converting a reduced model starts from the
        weights it stands for (its error is then measured against those)."""
        weights = quant.check_format(weights)
        if weights == self.weights:
            return self
        return LSTMModel(self.layer_params(), clip=self.clip, input_forget=self.input_forget,
                         dtype=np.float32 if weights != "float32" else self.dtype,
                         initial_state=None if self._init is None else (self._init[0], self._init[1][:, : self.hidden_size]),
                         head=self.head, source=dict(self._source, weights_from=self.weights),
                         kernel=self._kernel, reverse=self.reverse, weights=weights)

    # -- construction from already-packed buffers (used by the packed-file loader) --------------
    @classmethod
    def _from_packed(cls, plan, wbuf, fpar, initial_state, source, kernel="auto", weights="float32",
                     reduced=None, weight_error=None):
        self = cls.__new__(cls)
        self._set_packed(plan, wbuf, fpar, initial_state, source, policy.check_requested(kernel),
                         weights, reduced, weight_error)
        return self

    def _set_packed(self, plan, wbuf, fpar, init, source, kernel, weights="float32", reduced=None,
                    weight_error=None):
        self._plan = plan  # layout.Plan: sizes, flags, offsets (the only reader of offsets)
        wbuf = _placed(wbuf)
        self._wfull = _readonly(wbuf)  # (plan.total,) packed weights, see layout.py (or None: _wbuf)
        self._meta = plan.meta  # (M_LD + L*D*LD_STRIDE,) int64: the plan as the kernels read it
        self._fpar = _readonly(fpar)  # (F_LD + L*D*F_STRIDE,) float64 clip and activation params
        self._init = None if init is None else tuple(_readonly(np.ascontiguousarray(a)) for a in init)
        self._source = source
        self._kernel = kernel
        self.input_size = plan.I
        self.hidden_size = plan.H
        self.proj_size = plan.P
        self.num_layers = plan.L
        self.num_directions = plan.D
        self._out = plan.out
        self._head_o = plan.head_o
        self.output_size = plan.output_size
        self.dtype = wbuf.dtype
        #: the gate-matrix format: "float32", "int8" or "bfloat16" (see the class docstring)
        self.weights = weights
        self.weight_error = weight_error  # float or None (float32 weights: exact)
        self._rcanon = reduced  # [[quant.ReducedLayer per direction] per layer] or None: see _reduced
        self._rstack = None  # quant.ReducedStack: the reduced kernels, where the model fits them
        if reduced is not None:
            layers = self.layer_params()
            if quant.reduced_run_supported(layers, head=self.head, clip=self.clip,
                                           input_forget=self.input_forget):
                self._rstack = quant.ReducedStack(layers, weights, reduced=reduced)
                # its own kernels never read the float gate matrices: keep the rest, and build
                # the float copy only if a float path asks for it (see _wbuf)
                from .packed import _cut_gates

                self._wrest = _readonly(_cut_gates(plan, wbuf))
                self._wfull = None
                self._rcanon = None  # the stack's layouts are the only copy of the reduced gates

    @property
    def _reduced(self):
        """``[[quant.ReducedLayer per direction] per layer]`` (the reduced gates as canonical rows),
        or None for float32 weights. A model on its own reduced kernels keeps its gates only in
        the kernels' layouts: these are unpacked on first use and kept (``save`` and the float
        copy unpack them for the moment only, see :meth:`_canonical`)."""
        if self._rcanon is None and self._rstack is not None:
            self._rcanon = self._rstack.canonical()
        return self._rcanon

    def _canonical(self):
        """:attr:`_reduced` without keeping an unpacked copy."""
        return self._rcanon if self._rcanon is not None or self._rstack is None else self._rstack.canonical()

    @property
    def _wbuf(self) -> np.ndarray:
        """(plan.total,) the packed float weights, see layout.py. A reduced model that runs its own
        kernels holds only its reduced gate matrices and the rest of this buffer; the float gate
        matrices (what the reduced ones stand for) are built on the first use of a float path
        (``kernel="parallel"``, ``layer_params()``, ``Stream.numba_args()``) and kept."""
        w = self._wfull
        if w is None:
            w = self._wfull = _readonly(self._float_weights())
        return w

    @_wbuf.setter
    def _wbuf(self, wbuf):
        self._wfull = wbuf

    def _float_weights(self, gates=True) -> np.ndarray:
        """The full float buffer of a reduced model, from its rest and its reduced gates (the
        values the constructor packed: ``packed.load`` restores a reduced file the same way);
        ``gates=False``: the gate regions left zero (``save`` cuts them out)."""
        if self._wfull is not None:
            return self._wfull
        from .packed import _gate_regions

        plan, rest = self._plan, self._wrest
        wbuf = aligned.empty(plan.total, rest.dtype, lay.W_CONSTS)  # gate matrices on lines
        prev = src = 0
        for (a, b), q in zip(_gate_regions(plan), (q for row in self._canonical() for q in row)):
            wbuf[prev:a] = rest[src : src + a - prev]
            src += a - prev
            prev = b
            wbuf[a:b] = lay.to_panels(quant.fuse_gates(*q.weights()).astype(rest.dtype)).ravel() if gates else 0  # panels
        wbuf[prev:] = rest[src:]
        return wbuf

    def _reduced_for(self, kernel):
        """The :class:`quant.ReducedStack` that runs a request, or None (the float kernels): a
        reduced model runs its own serial kernels unless "parallel" is asked for, here or at
        construction (the parallel kernels are float ones, over the weights these stand for)."""
        if self._rstack is None:
            return None
        requested = self._kernel if kernel is None else policy.check_requested(kernel)
        return None if requested == "parallel" else self._rstack

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
        """True when the forget gate is coupled to the input gate: ``f = 1 - i``."""
        return self._plan.coupled

    @property
    def reverse(self) -> bool:
        """True for a one-direction model that runs backwards in time."""
        return self._plan.reverse

    @property
    def initial_state(self):
        """``(h0 (L*D, out), c0 (L*D, H))`` copies, or None when the model starts from zeros."""
        return None if self._init is None else (self._init[0].copy(), self._init[1].copy())

    @property
    def head(self):
        """``(weight (O, D*out), bias (O,))`` copies, or None."""
        views = self._plan.head(self._wbuf) if self._head_o else None
        if views is None:
            return None
        return views[0].T.copy(), views[1].copy()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed float weights; for a reduced model, with its gate matrices counted
        in their reduced format (what a reduced step reads and a packed file stores)."""
        plan, size = self._plan, np.dtype(self.dtype).itemsize
        if self.weights == "float32":
            return int(plan.total * size)
        gates = sum(plan.record(l, d).K * plan.C for l in range(plan.L) for d in range(plan.D))
        reduced = (sum(q.nbytes for row in self._rcanon for q in row) if self._rcanon is not None
                   else self._rstack.canonical_nbytes)
        return int((plan.total - gates) * size + reduced)

    def _choose(self, kernel, streams: int, job: str = "step", steps: int = 1) -> policy.KernelChoice:
        """The policy's kernel for this model: ``kernel`` or the model's own request."""
        requested = self._kernel if kernel is None else policy.check_requested(kernel)
        return policy.choose_kernel(self.weight_bytes, streams,
                                    _config.num_threads(), requested, job, steps)

    @property
    def default_kernel(self) -> str:
        """The kernel a lone stream of this model runs by default ("serial" or "parallel")."""
        rstack = self._reduced_for(None)
        if rstack is not None and rstack.streamable:
            return "serial"  # the reduced kernels (Stream reports the same)
        return self._choose(None, 1).name

    def activations(self, layer=0, direction=0):
        codes = self._plan.act_codes[layer * self.num_directions + direction]
        frec = lay.F_LD + (layer * self.num_directions + direction) * lay.F_STRIDE
        return tuple(
            Activation(_CODE_TO_NAME[codes[j]], float(self._fpar[frec + 2 * j]),
                       float(self._fpar[frec + 2 * j + 1]))
            for j in range(3))

    def layer_params(self):
        """The canonical weights, unpacked (float64 copies): ``[[LayerParams per direction] per layer]``."""
        rows = []
        wbuf = self._wbuf.astype(np.float64)  # once, not per layer and direction
        for l in range(self.num_layers):
            row = []
            for d in range(self.num_directions):
                w_cat, bias, peep, w_hr = lay.unpack_layer(self._plan, wbuf, l, d)
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
            if self._plan.has_peep:
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
            "peepholes": self._plan.has_peep,
            "has_initial_state": self._init is not None,
            "dtype": str(self.dtype),
            "parameters": self.parameter_count(),
            "weight_bytes": self.weight_bytes,
            "weights": self.weights,
            "weight_error": self.weight_error,
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

        reduced = None if self.weights == "float32" else self._canonical()
        wbuf = self._float_weights(gates=reduced is None)  # a reduced file stores its own gates
        save(path, self._plan, wbuf, self._fpar, self._init, self._source, self.weights,
             reduced, self.weight_error)

    # -- whole sequences -------------------------------------------------------------------------
    def run(self, x, state=None, lengths=None, kernel=None):
        """Run a whole sequence, time-major.

        x (T, I) or (T, B, I); state ``(h (L*D, [B,] out), c (L*D, [B,] H))`` or None for the
        model's initial state; lengths (B,) valid steps per sequence (ONNX ``sequence_lens``),
        or None for all T. Returns ``y (T, [B,] D*out or O)`` and the final ``(h, c)``.
        Outputs past a sequence's length are zero and its final state is the state at its
        last valid step; the reverse direction starts from that step.
        ``kernel``: "auto" follows :func:`lstm_cpu.policy.choose_kernel` (parallel for large
        enough models or batches when Numba has more than one thread); "parallel", asked for here
        or at construction, runs each layer in one parallel region: groups of sequences per
        thread, or a team of threads sharing every time step (``policy.sequence_team``). The
        bits are the serial kernel's either way, and a stream's: stepping the same inputs
        through ``model.stream()`` gives the same outputs and state, to the bit. A short,
        full-length forward run (``policy.run_as_steps``) goes through the streaming kernels.
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
        rstack = self._reduced_for(kernel)
        if rstack is not None:  # reduced weights: their own kernels, B sequences per weight load
            groups = policy.reduced_groups(self.weight_bytes, B, _config.num_threads(),
                                           self._kernel if kernel is None else kernel)
            y, hN, cN = rstack.run_groups(xb, h0, c0, lens, reverse=self.reverse, groups=groups)
            return (y, (hN, cN)) if batched else (y[:, 0, :], (hN[:, 0, :], cN[:, 0, :]))
        plan, wbuf, meta = self._plan, self._wbuf, self._meta
        C, Hp = plan.C, plan.Hp
        if policy.run_as_steps(T, D, self.reverse, lens):
            y, hN, cN = self._run_as_steps(xb, h0, c0, kernel)
            return (y, (hN, cN)) if batched else (y[:, 0, :], (hN[:, 0, :], cN[:, 0, :]))
        choice = self._choose(kernel, B, job="sequence", steps=T)
        fn = kernels.layer_sequence_parallel if choice.parallel else kernels.layer_sequence_serial
        team = policy.sequence_team(B, _config.num_threads(), C, Hp) if choice.parallel else None
        # In parallel, per-sequence rows start on cache lines (aligned.empty), so that threads
        # splitting a row at panel or unit-range bounds (multiples of 16 floats) never share a
        # line (two threads writing one line every step: 1.5x slower). Serially, plain numpy
        # buffers: an aligned one costs about 4 us of Python each (7 us per call of T=1).
        if choice.parallel:
            def buf(*shape):
                return aligned.empty(int(np.prod(shape)), self.dtype).reshape(shape)
        else:
            def buf(*shape):
                return np.empty(shape, self.dtype)
        acc = buf(B, C)  # (B, C) gate pre-activations
        mb = buf(B, Hp)  # (B, Hp) o * h_act(c), before the projection
        hN = np.empty((L * D, B, out), self.dtype)
        cN = np.empty((L * D, B, H), self.dtype)
        inp = xb  # (T, B, fan_in)
        in_fn = kernels.input_projection_parallel if choice.parallel else kernels.input_projection_serial
        in_args = (team.participants,) if choice.parallel else ()
        for l in range(L):
            # (T, B, D*out), direction d in columns d*out..: the Numba kernels write every
            # element (zeros past a sequence's length), each on the thread that computes it
            y = buf(T, B, D * out)
            kin = plan.input_rows(l)
            X = np.ascontiguousarray(inp.reshape(T * B, kin))  # (T*B, kin)
            if not X.flags.writeable:
                X = X.copy()
            for d in range(D):
                h = buf(B, out)  # (B, out) a copy: never the caller's array
                h[...] = h0[l * D + d]
                c = buf(B, Hp)  # (B, Hp) padded cell state
                c[:, H:] = 0
                c[:, :H] = c0[l * D + d]
                # Projections and recurrence in chunks of Tc steps (policy.sequence_chunk;
                # Tc = T for all but long, wide batches), each chunk projected in one pass over
                # W's panels right before the recurrence reads it, each element's chain started
                # from the bias as a step's is (so run has a step's bits). A backward direction
                # takes the chunks last first.
                self._sequence_chunks(X, in_fn, fn, in_args, team, l, d, lens, h, c, y, acc,
                                      mb, d == 1 or self.reverse)
                hN[l * D + d], cN[l * D + d] = h, c[:, :H]
            empty = lens == 0  # onnxruntime: a sequence of length 0 ends in a zero state
            if empty.any():
                hN[l * D:(l + 1) * D, empty] = 0
                cN[l * D:(l + 1) * D, empty] = 0
            inp = y
        y = inp
        if self._head_o:
            # the head as a stream's step applies it, so run keeps a stream's bits
            z = np.empty((T * B, self._head_o), self.dtype)  # (T*B, O)
            kernels.head_rows(np.ascontiguousarray(y.reshape(T * B, D * out)), wbuf, meta, z)
            y = z.reshape(T, B, self._head_o)
            if lengths is not None:
                y[np.arange(T)[:, None] >= lens[None, :]] = 0
        if not batched:
            return y[:, 0, :], (hN[:, 0, :], cN[:, 0, :])
        return y, (hN, cN)

    def _run_as_steps(self, xb, h0, c0, kernel):
        """``run`` of a short, full-length forward sequence (``policy.run_as_steps``) through the
        streaming kernels, the ones ``model.stream(batch=B)`` would pick: the same bits as the
        sequence kernels (tests/test_run_bits.py) without their fixed costs. xb (T, B, I);
        h0 (L, B, out), c0 (L, B, H). Returns y (T, B, O), h (L, B, out), c (L, B, H)."""
        T, B, I = xb.shape
        L, H, out, Hp = self.num_layers, self.hidden_size, self._out, self._plan.Hp
        meta, dtype = self._meta, self.dtype
        h_off, c_off, z_off, _a, _m, end = (int(v) for v in lay.sbuf_offsets(meta, B))
        sbuf = np.empty(end, dtype)  # state and scratch, see layout.py
        h = sbuf[h_off:c_off].reshape(L, B, out)  # (L, B, out) view
        c = sbuf[c_off:z_off].reshape(L, B, Hp)  # (L, B, Hp) view
        h[...] = h0
        c[:, :, :H] = c0
        c[:, :, H:] = 0
        O = self.output_size
        xk = np.ascontiguousarray(xb.reshape(T, B * I))  # (T, B*I)
        if not xk.flags.writeable:
            xk = xk.copy()
        ys = np.empty((T, B * O), dtype)  # (T, B*O)
        choice = self._choose(kernel, B)
        if choice.parallel:
            threads = _config.num_threads()
            groups = policy.step_groups(B, threads)
            with kernels.parallel_guard():
                if groups:
                    kernels.stack_run_split(xk, groups, self._wbuf, meta, self._fpar, sbuf, ys)
                else:
                    kernels.stack_run_parallel(xk, lay.unit_ranges(Hp, threads), self._wbuf,
                                               meta, self._fpar, sbuf, ys)
        else:
            kernels.stack_run_serial(xk, self._wbuf, meta, self._fpar, sbuf, ys)
        return ys.reshape(T, B, O), h.copy(), c[:, :, :H].copy()

    def _sequence_chunks(self, X, in_fn, fn, in_args, team, l, d, lens, h, c, y, acc, mb,
                         backward):
        """Layer l, direction d of ``run`` over X (T*B, kin), time-major, in chunks of Tc steps:
        xp (Tc, B, C) <- the chunk's input projections, then the recurrence over it, writing
        y[t0:t1] (T, B, D*out) and updating h (B, out), c (B, Hp). A chunk's lengths are the
        global ones minus t0, clipped to [0, Tc]: the kernels' "t < lengths[s]" in chunk time.
        Each row is projected on its own, so the bits do not depend on Tc (tests)."""
        T, B = y.shape[0], y.shape[1]
        C = self._plan.C
        wbuf, meta, fpar = self._wbuf, self._meta, self._fpar
        # The team kernel runs whole, with no extra parallel regions per chunk ((128,256,2)
        # B=16, 2 threads, one run: 323 us chunked, 286-302 whole, before the team kernel).
        parallel = team is not None  # policy.sequence_team's shape of the parallel kernel
        itemsize = np.dtype(self.dtype).itemsize
        if parallel and team.stream_groups > 1:
            # groups of sequences, each projected and run on its own thread, chunked as below
            SG = team.stream_groups
            Tc = policy.sequence_chunk(T, -(-B // SG), C, itemsize)
            with kernels.parallel_guard():
                kernels.layer_run_split(X.reshape(T, B, -1), SG, Tc, wbuf, meta, fpar, l, d, lens,
                                        h, c, y, acc, mb)
            return
        Tc = T if parallel else policy.sequence_chunk(T, B, C, itemsize)
        xp = np.empty((Tc, B, C), self.dtype)  # (Tc, B, C), reused by every chunk
        starts = list(range(0, T, Tc))
        for t0 in (reversed(starts) if backward else starts):
            t1 = min(T, t0 + Tc)
            n = t1 - t0
            part = xp[:n]  # (n, B, C)
            clens = lens if Tc == T else np.clip(lens - t0, 0, n)  # (B,) int64
            with (kernels.parallel_guard() if parallel else nullcontext()):
                in_fn(X[t0 * B : t1 * B], *in_args, wbuf, meta, l, d, part.reshape(n * B, C))
                if parallel:
                    sync = new_sync(team.tasks(B, self._plan.P > 0))  # (team.sync_size,) int64
                    fn(part, *team.args(), wbuf, meta, fpar, l, d, clens, h, c, y[t0:t1], acc, mb,
                       sync)
                else:
                    fn(part, 1, wbuf, meta, fpar, l, d, clens, h, c, y[t0:t1], acc, mb)

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
        N = 1 if batch is None else batch
        self._N = N
        choice = model._choose(kernel, N)
        self.kernel = choice.name  # "serial" or "parallel" (lstm_cpu.policy)
        plan, meta = model._plan, model._meta
        h_off, c_off, z_off, acc_off, _m, end = (int(v) for v in lay.sbuf_offsets(meta, N))
        self._sbuf = np.zeros(end, model.dtype)  # state and scratch, see layout.py
        L, out, Hp, C = plan.L, plan.out, plan.Hp, plan.C
        self._h = self._sbuf[h_off:c_off].reshape(L, N, out)  # (L, N, out) view
        self._c = self._sbuf[c_off:z_off].reshape(L, N, Hp)  # (L, N, Hp) view
        self._x = np.zeros(N * model.input_size, model.dtype)  # (N*I,) conversion buffer
        # The streams of a reduced model step through the reduced kernels (all N at once), on
        # views of this stream's own h and c (so state, reset and snapshots work unchanged); they
        # never read the float weights, so the model need not hold a float copy for them.
        self._rstep = self._rrun = None
        rstack = model._reduced_for(kernel)
        if rstack is not None and rstack.streamable:
            self._init_reduced(rstack, policy.reduced_groups(
                model.weight_bytes, N, _config.num_threads(), model._kernel if kernel is None else kernel))
            return
        self._step_fn = kernels.stack_step_parallel if choice.parallel else kernels.stack_step_serial
        self._run_fn = kernels.stack_run_parallel if choice.parallel else kernels.stack_run_serial
        self._guard = kernels.parallel_guard if choice.parallel else None
        R = lay.unit_ranges(Hp, _config.num_threads()) if choice.parallel else 1  # unit ranges
        groups = policy.step_groups(N, _config.num_threads()) if choice.parallel else 0
        if groups:  # groups of streams, each whole on one thread (policy.step_groups)
            self._step_fn, self._run_fn, R = kernels.stack_step_split, kernels.stack_run_split, groups
        # Precomputed for the hot path: kernels take flat x (N*I,) and y (N*O,), stream-major.
        self._dtype = np.dtype(model.dtype)
        self._single = batch is None
        self._want = (model.input_size,) if batch is None else (N, model.input_size)
        self._yshape = (model.output_size,) if batch is None else (N, model.output_size)
        self._ylen = N * model.output_size
        # The kernels' arguments after x: the parallel twins also take their unit ranges (or
        # stream groups) R.
        self._wargs = (((R,) if choice.parallel else ()) + (model._wbuf, model._meta, model._fpar, self._sbuf))
        # The compiled kernel for exactly these argument types: step() guarantees them, so the
        # per-call type dispatch of Numba (~1 us, a third of a small model's step) is skipped.
        self._step_call = kernels.compiled_entry(
            self._step_fn, (self._x, *self._wargs, np.empty(self._ylen, self._dtype)))
        if batch is None and not choice.parallel:
            self.step = self._one_stream_step()  # the common case's hot path, see there
        self.reset()

    def _one_stream_step(self):
        """:meth:`step` for one stream on the serial float kernel, as a closure over this
        stream's arrays, installed as the instance's ``step``: the same checks and the same
        kernel call with no attribute lookups or argument tuple on the way (2.7 -> 2.6 us a step
        at (32, 64, 1), where 5x onnxruntime needs 2.5). Anything it does not take as it is
        (other types, dtypes, shapes, read-only or strided arrays) goes to :meth:`step` itself,
        which converts or raises the same errors."""
        general = Stream.step.__get__(self)
        call = self._step_call
        wbuf, meta, fpar, sbuf = self._wargs
        dtype, want, yshape, ylen = self._dtype, self._want, self._yshape, self._ylen
        nd, empty, flags = np.ndarray, np.empty, _KERNEL_FLAGS

        def step(x, out=None):
            if type(x) is nd and x.dtype is dtype and x.shape == want and x.flags.num & flags == flags:
                if out is None:
                    y = empty(ylen, dtype)
                    call(x, wbuf, meta, fpar, sbuf, y)
                    return y
                if (type(out) is nd and out.dtype is dtype and out.shape == yshape
                        and out.flags.num & flags == flags):
                    call(x, wbuf, meta, fpar, sbuf, out)
                    return out
            return general(x, out)

        step.__doc__ = Stream.step.__doc__
        return step

    def _init_reduced(self, rstack, groups):
        """The rest of ``__init__`` for streams on a reduced model's kernels (``quant.ReducedBatch``),
        in ``groups`` ranges of streams on threads (``policy.reduced_groups``)."""
        m, N = self.model, self._N
        rb = rstack.streams(N, self._h, self._c, groups)
        self._rstep, self._rrun = rb.step_into, rb.run_into
        self.kernel = "serial" if rb.groups == 1 else "parallel"
        self._guard, self._wargs = None, None
        self._dtype = np.dtype(m.dtype)
        self._single = self.batch is None
        self._want = (m.input_size,) if self.batch is None else (N, m.input_size)
        self._yshape = (m.output_size,) if self.batch is None else (N, m.output_size)
        self._ylen = N * m.output_size
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
        if self._rstep is not None:
            self._rstep(xk, y)
        elif self._guard is None:
            self._step_call(xk, *self._wargs, y)
        else:
            with self._guard():
                self._step_call(xk, *self._wargs, y)
        return ret

    def numba_args(self):
        """``(wbuf, meta, fpar, sbuf)`` for ``lstm_cpu.kernels.stack_step_serial(x, wbuf, meta,
        fpar, sbuf, y)`` called from your own ``@numba.njit`` code: the model's packed arrays and
        this stream's live state (updated in place by each step, exactly as :meth:`step` does).
        x (N*I,) and y (N*O,) are flat, stream-major, of the model's dtype."""
        if self._wargs is None:  # a reduced stream: the float weights, built now, on the same state
            m = self.model
            return m._wbuf, m._meta, m._fpar, self._sbuf
        return self._wargs[-4:]

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
        if self._rrun is not None:
            self._rrun(xk, ys)
        elif T:
            if self._guard is None:
                self._run_fn(xk, *self._wargs, ys)
            else:
                with self._guard():
                    self._run_fn(xk, *self._wargs, ys)
        return ys.reshape((T,) + self._yshape)

    def __repr__(self):
        return f"Stream(batch={self.batch}, kernel={self.kernel!r}, model={self.model!r})"
