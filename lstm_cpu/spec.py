"""The canonical LSTM: gate order, per-direction weights and activations.

This module is the *one place* that defines the canonical gate order. Every importer maps its
source order onto it; the packer (:mod:`lstm_cpu.layout`) and the kernels read it from here.

Equations (PyTorch's and ONNX's, with the ONNX extensions; ``*`` is element-wise)::

    z  = [x_t | h_{t-1}]                                     (in + out,)
    a  = W_ih @ x_t + W_hh @ h_{t-1} + b                      (4H,)  gates in GATE_ORDER
    i  = f_act(clip(a_i + p_i * c_{t-1}))                     input gate
    f  = f_act(clip(a_f + p_f * c_{t-1}))                     forget gate
    f  = 1 - i                     if input_forget (coupled)  (ONNX ``input_forget=1``, as
                                                              onnxruntime computes it)
    g  = g_act(clip(a_g))                                     cell candidate
    c_t = f * c_{t-1} + i * g                                 (H,)
    o  = f_act(clip(a_o + p_o * c_t))                         output gate
    m  = o * h_act(c_t)                                       (H,)
    h_t = W_hr @ m  if a projection exists, else m           (out,)  out = P or H

``clip(v)`` bounds to ``[-clip, clip]`` when a cell clip is set (ONNX ``clip``), else is identity.
Sources: Hochreiter & Schmidhuber 1997; Gers et al. 2002 (peepholes); Sak et al. 2014
(projection, as in ``torch.nn.LSTM(proj_size=...)``); the ONNX ``LSTM`` operator spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import InputError, UnsupportedModelError

# ---------------------------------------------------------------------------------------------
# Canonical gate order
# ---------------------------------------------------------------------------------------------
#: Canonical order of the four gate blocks along the 4H axis of ``W_ih``, ``W_hh`` and ``bias``.
#: It is PyTorch's order. ONNX stores (i, o, f, c) and Keras (i, f, c, o): importers permute
#: with :func:`reorder_gates`.
GATE_ORDER = ("i", "f", "g", "o")
GATE_I, GATE_F, GATE_G, GATE_O = 0, 1, 2, 3

#: Canonical order of the three peephole vectors in ``peephole (3H,)``. ONNX's ``P`` is (i, o, f).
PEEPHOLE_ORDER = ("i", "f", "o")

# ONNX calls the cell candidate "c"; the importer maps letters through this alias table.
_GATE_ALIASES = {"i": "i", "f": "f", "g": "g", "c": "g", "o": "o"}


def gate_permutation(source_order: Sequence[str]) -> np.ndarray:
    """Indices ``p`` such that ``canonical_block[k] = source_block[p[k]]``.

    ``source_order`` names the source's gate blocks, e.g. ``"iofc"`` for ONNX.
    """
    src = [_GATE_ALIASES[s] for s in source_order]
    if sorted(src) != sorted(GATE_ORDER):
        raise ValueError(f"gate order must name i, f, g/c, o once each, got {source_order!r}")
    return np.array([src.index(g) for g in GATE_ORDER], dtype=np.int64)


def reorder_gates(a: np.ndarray, source_order: Sequence[str], axis: int = 0) -> np.ndarray:
    """Reorder the four gate blocks of ``a`` along ``axis`` from ``source_order`` to GATE_ORDER."""
    a = np.asarray(a)
    n = a.shape[axis]
    if n % 4:
        raise ValueError(f"gate axis must have length 4*H, got {n}")
    blocks = np.split(a, 4, axis=axis)
    return np.concatenate([blocks[k] for k in gate_permutation(source_order)], axis=axis)


def gates_to(a: np.ndarray, target_order: Sequence[str], axis: int = 0) -> np.ndarray:
    """The inverse of :func:`reorder_gates`: canonical gate blocks of ``a`` -> ``target_order``."""
    a = np.asarray(a)
    if a.shape[axis] % 4:
        raise ValueError(f"gate axis must have length 4*H, got {a.shape[axis]}")
    blocks = np.split(a, 4, axis=axis)
    perm = gate_permutation(target_order)  # canonical_block[k] = target_block[perm[k]]
    out = [None] * 4
    for k, src in enumerate(perm):
        out[src] = blocks[k]
    return np.concatenate(out, axis=axis)


def _peephole_permutation(source_order: Sequence[str]) -> list:
    src = list(source_order)
    if sorted(src) != sorted(PEEPHOLE_ORDER):
        raise ValueError(f"peephole order must name i, f, o once each, got {source_order!r}")
    return [src.index(g) for g in PEEPHOLE_ORDER]


def reorder_peepholes(p: np.ndarray, source_order: Sequence[str]) -> np.ndarray:
    """Peepholes ``p (3H,)`` from ``source_order`` (ONNX: ``"iof"``) to PEEPHOLE_ORDER (i, f, o)."""
    blocks = np.split(np.asarray(p), 3)
    return np.concatenate([blocks[k] for k in _peephole_permutation(source_order)])


def peepholes_to(p: np.ndarray, target_order: Sequence[str]) -> np.ndarray:
    """The inverse of :func:`reorder_peepholes`: canonical (i, f, o) -> ``target_order``."""
    blocks = np.split(np.asarray(p), 3)
    out = [None] * 3
    for k, src in enumerate(_peephole_permutation(target_order)):
        out[src] = blocks[k]
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Activations (the ONNX set)
# ---------------------------------------------------------------------------------------------
#: name -> (code used by the kernels, default alpha, default beta, how many of alpha/beta it takes).
#: Defaults are those of the standalone ONNX operators. (Inside an LSTM node onnxruntime uses 0.0
#: for a missing Affine/ThresholdedRelu/ScaledTanh parameter; the ONNX importer always passes
#: explicit values, so imported models match onnxruntime.) Formulas (x is the input):
#:   Sigmoid 1/(1+e^-x) | Tanh tanh(x) | Relu max(0,x) | HardSigmoid max(0,min(1,a*x+b))
#:   Affine a*x+b | LeakyRelu x if x>=0 else a*x | ThresholdedRelu x if x>a else 0
#:   ScaledTanh a*tanh(b*x) | Elu x if x>=0 else a*(e^x-1) | Softsign x/(1+|x|) | Softplus log(1+e^x)
ACTIVATIONS = {
    "Sigmoid": (0, 0.0, 0.0, 0),
    "Tanh": (1, 0.0, 0.0, 0),
    "Relu": (2, 0.0, 0.0, 0),
    "HardSigmoid": (3, 0.2, 0.5, 2),
    "Affine": (4, 1.0, 0.0, 2),
    "LeakyRelu": (5, 0.01, 0.0, 1),
    "ThresholdedRelu": (6, 1.0, 0.0, 1),
    "ScaledTanh": (7, 1.0, 1.0, 2),
    "Elu": (8, 1.0, 0.0, 1),
    "Softsign": (9, 0.0, 0.0, 0),
    "Softplus": (10, 0.0, 0.0, 0),
}
_ACT_BY_LOWER = {k.lower(): k for k in ACTIVATIONS}


@dataclass(frozen=True)
class Activation:
    """One activation function with its parameters (ONNX ``activations`` + alpha/beta)."""

    name: str
    alpha: float = float("nan")  # NaN means "the function's default"
    beta: float = float("nan")

    def __post_init__(self):
        canon = _ACT_BY_LOWER.get(str(self.name).lower())
        if canon is None:
            raise UnsupportedModelError(
                f"activation {self.name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        object.__setattr__(self, "name", canon)
        _, da, db, _ = ACTIVATIONS[canon]
        if np.isnan(self.alpha):
            object.__setattr__(self, "alpha", da)
        if np.isnan(self.beta):
            object.__setattr__(self, "beta", db)

    @property
    def code(self) -> int:
        return ACTIVATIONS[self.name][0]


#: The default (f, g, h) = (Sigmoid, Tanh, Tanh): the fast path.
DEFAULT_ACTIVATIONS: Tuple[Activation, Activation, Activation] = (
    Activation("Sigmoid"),
    Activation("Tanh"),
    Activation("Tanh"),
)


def as_activations(acts) -> Tuple[Activation, Activation, Activation]:
    """Normalise ``acts`` (None, 3 names, or 3 Activation/tuples) to three Activations (f, g, h)."""
    if acts is None:
        return DEFAULT_ACTIVATIONS
    acts = list(acts)
    if len(acts) != 3:
        raise InputError(f"activations must be 3 functions (f, g, h), got {len(acts)}")
    out = []
    for a in acts:
        if isinstance(a, Activation):
            out.append(a)
        elif isinstance(a, str):
            out.append(Activation(a))
        else:
            out.append(Activation(*a))
    return tuple(out)


def is_default_activations(acts: Sequence[Activation]) -> bool:
    return tuple(a.name for a in acts) == ("Sigmoid", "Tanh", "Tanh")


# ---------------------------------------------------------------------------------------------
# Canonical weights
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerParams:
    """Weights of one layer in one direction, canonical gate order (see GATE_ORDER).

    Shapes (H hidden units, ``in`` inputs to this layer, ``out`` = P if projected else H)::

        w_ih      (4H, in)   input weights, gate blocks i, f, g, o
        w_hh      (4H, out)  recurrent weights, same gate blocks
        bias      (4H,)      input and recurrent biases already folded together
        w_hr      (P, H)     optional projection (PyTorch ``weight_hr``)
        peephole  (3H,)      optional peepholes, order i, f, o (PEEPHOLE_ORDER)
    """

    w_ih: np.ndarray
    w_hh: np.ndarray
    bias: Optional[np.ndarray] = None
    w_hr: Optional[np.ndarray] = None
    peephole: Optional[np.ndarray] = None
    activations: Tuple[Activation, Activation, Activation] = field(
        default_factory=lambda: DEFAULT_ACTIVATIONS
    )

    @property
    def hidden_size(self) -> int:
        return int(np.shape(self.w_ih)[0]) // 4

    @property
    def input_size(self) -> int:
        return int(np.shape(self.w_ih)[1])

    @property
    def output_size(self) -> int:
        return self.hidden_size if self.w_hr is None else int(np.shape(self.w_hr)[0])
