"""A float64 numpy LSTM that reads like the equations in ``lstm_cpu/spec.py``.

It is the test oracle that needs neither torch nor onnxruntime. Slow and obvious on purpose:
one time step, one batch item at a time, no packing.
"""

from __future__ import annotations

import numpy as np

from lstm_cpu.spec import DEFAULT_ACTIVATIONS


def act(name, alpha, beta, x):
    """The ONNX activation ``name`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    if name == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "Tanh":
        return np.tanh(x)
    if name == "Relu":
        return np.maximum(x, 0.0)
    if name == "HardSigmoid":
        return np.clip(alpha * x + beta, 0.0, 1.0)
    if name == "Affine":
        return alpha * x + beta
    if name == "LeakyRelu":
        return np.where(x >= 0, x, alpha * x)
    if name == "ThresholdedRelu":
        return np.where(x > alpha, x, 0.0)
    if name == "ScaledTanh":
        return alpha * np.tanh(beta * x)
    if name == "Elu":
        return np.where(x >= 0, x, alpha * (np.exp(x) - 1.0))
    if name == "Softsign":
        return x / (1.0 + np.abs(x))
    if name == "Softplus":
        return np.log1p(np.exp(x))
    raise ValueError(name)


def cell(p, x, h, c, clip=None, input_forget=False):
    """One step of one direction. p: LayerParams. x (in,), h (out,), c (H,) -> (h', c')."""
    H = p.hidden_size
    fa, ga, ha = p.activations if p.activations is not None else DEFAULT_ACTIVATIONS
    f_ = lambda v: act(fa.name, fa.alpha, fa.beta, v)
    g_ = lambda v: act(ga.name, ga.alpha, ga.beta, v)
    h_ = lambda v: act(ha.name, ha.alpha, ha.beta, v)
    cl = (lambda v: np.clip(v, -clip, clip)) if clip else (lambda v: v)
    w_ih = np.asarray(p.w_ih, np.float64)
    w_hh = np.asarray(p.w_hh, np.float64)
    b = np.zeros(4 * H) if p.bias is None else np.asarray(p.bias, np.float64)
    a = w_ih @ x + w_hh @ h + b
    ai, af, ag, ao = a[:H], a[H : 2 * H], a[2 * H : 3 * H], a[3 * H :]
    if p.peephole is not None:
        pi, pf, po = np.split(np.asarray(p.peephole, np.float64), 3)
    else:
        pi = pf = po = np.zeros(H)
    i = f_(cl(ai + pi * c))
    f = 1.0 - i if input_forget else f_(cl(af + pf * c))
    g = g_(cl(ag))
    c_new = f * c + i * g
    o = f_(cl(ao + po * c_new))
    m = o * h_(c_new)
    h_new = m if p.w_hr is None else np.asarray(p.w_hr, np.float64) @ m
    return h_new, c_new


def run(layers, x, h0=None, c0=None, clip=None, input_forget=False, lengths=None, reverse=False):
    """Whole sequence. layers[l][d] = LayerParams; x (T, B, I) -> y (T, B, D*out), h (L*D, B, out), c (L*D, B, H).

    ``lengths`` (B,): steps after a sequence's length give zeros and do not touch its state; the
    reverse direction starts at that sequence's last valid step; a sequence of length 0 ends in
    a zero state (as onnxruntime). ``reverse``: a one-direction stack that runs backwards.
    """
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    L, D = len(layers), len(layers[0])
    H, out = layers[0][0].hidden_size, layers[0][0].output_size
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = np.zeros((L * D, B, out)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((L * D, B, H)) if c0 is None else np.asarray(c0, np.float64)
    hN, cN = h0.copy(), c0.copy()
    inp = x
    for l in range(L):
        y = np.zeros((T, B, D * out))
        for d in range(D):
            p = layers[l][d]
            for n in range(B):
                h, c = h0[l * D + d, n].copy(), c0[l * D + d, n].copy()
                backward = d == 1 or reverse
                steps = range(lengths[n] - 1, -1, -1) if backward else range(lengths[n])
                for t in steps:
                    h, c = cell(p, inp[t, n], h, c, clip, input_forget)
                    y[t, n, d * out : (d + 1) * out] = h
                if lengths[n] == 0:
                    h, c = np.zeros_like(h), np.zeros_like(c)
                hN[l * D + d, n], cN[l * D + d, n] = h, c
        inp = y
    return inp, (hN, cN)
